"""create_model across families: γ0 on every BN (the last of each block included) and zero_init_last."""

import pytest
import timm
import torch
from torch import nn

import timm_bninit as tb


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "dla34", "rexnet_100",
                                  "regnetx_002", "densenet121", "cspresnet50", "resnetv2_50d"])
def test_create_model_gives_gamma0_on_every_bn(arch):
    model = tb.create_model(arch, "bn_gamma01", num_classes=3)
    layers = bn_layers(model)
    assert layers and all(isinstance(m, tb.BatchNormGamma2d | tb.BatchNormGammaAct2d) for m in layers)
    assert all(torch.all(m.weight == 0.1) and torch.all(m.bias == 0) for m in layers)


def test_create_model_zero_init_last_interplay():
    default = tb.create_model("resnet50", "bn_gamma01")
    assert all(torch.all(m.weight == 0.1) for m in bn_layers(default)) and len(bn_layers(default)) == 53
    zeroed = tb.create_model("resnet50", "bn_gamma01", zero_init_last=True)
    assert all(torch.all(b.bn3.weight == 0) for stage in (zeroed.layer1, zeroed.layer4) for b in stage)
    assert torch.all(zeroed.layer1[0].bn1.weight == 0.1)


def test_timm_zero_init_last_false_lands_gamma0_on_all_53_layers():
    model = timm.create_model("resnet50", norm_layer="bn_gamma01", zero_init_last=False)
    layers = bn_layers(model)
    assert len(layers) == 53 and all(torch.all(m.weight == 0.1) for m in layers)
