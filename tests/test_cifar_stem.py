"""The CIFAR stem as timm model names: ``timm.create_model("resnet18_cifar_stem")`` builds what a run with
``cifar_stem: true`` builds, so a shared config.json can name it."""

import pytest
import timm
import torch
from fake_datasets import tiny_config
from torch import nn

import timm_bninit as tb
from timm_bninit.experiment.model import build_model


def test_the_registered_names_build_the_run_architecture(tmp_path):
    assert {tb.cifar_stem_name(base) for base in tb.CIFAR_STEM_BASES} <= set(timm.list_models("*_cifar_stem"))
    model = timm.create_model("resnet18_cifar_stem", norm_layer="bn_gamma01", num_classes=3)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity) and isinstance(model.bn1, tb.BatchNormGamma2d)
    run_model = build_model(tiny_config(tmp_path, tmp_path, model="resnet18", cifar_stem=True,
                                        norm_layer="bn_gamma01"), 3)
    expected = run_model.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    # the same weights give the same function: 32 px in, a 4×4 map at the pool (stride 8, no stem downsampling)
    model.load_state_dict(expected)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.eval()(x), run_model.eval()(x))
    assert model.forward_features(x).shape[-2:] == (4, 4)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and not model.pretrained_cfg.get("hf_hub_id")


def test_a_model_of_ones_own_registers_and_a_deep_stem_is_refused():
    # timm's registry is global: test_export relies on seresnet18 having no CIFAR-stem name, so not that one here
    assert tb.register_cifar_stem_model("resnet26") == "resnet26_cifar_stem"
    assert isinstance(timm.create_model("resnet26_cifar_stem", num_classes=2).maxpool, nn.Identity)
    with pytest.raises(tb.BNInitError, match="single-conv stem; ResNet has none"):
        tb.apply_cifar_stem(timm.create_model("test_resnet"))  # a deep 3-conv stem
