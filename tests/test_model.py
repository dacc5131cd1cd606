"""The model a run starts from: every non-norm tensor is the seed's plain-BN reference, however many are built."""

from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.recipe import load_recipe
from timm_bninit.experiment.seeding import rng_scope, seed_for

SEED = 6


def config(**changes):
    base = replace(load_recipe("demo"), model="test_resnet", norm_layer=None, pretrained=False, pretrained_file=None,
                   cifar_stem=False, zero_init_last=False, drop_rate=0.0, drop_path_rate=0.0, seed=SEED,
                   precise_bn_batches=0)
    return replace(base, **changes)


def reference(num_classes: int, name: str = "test_resnet", **kwargs) -> dict[str, torch.Tensor]:
    """The definition of the shared init: timm's plain-BN model built under the seed's ``init`` stream."""
    with rng_scope(seed_for(SEED, "init")):
        return timm.create_model(name, num_classes=num_classes, drop_rate=0.0, **kwargs).state_dict()


def norm_keys(model: nn.Module) -> set[str]:
    names = {name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    return {key for key in model.state_dict() if key.rpartition(".")[0] in names}


def test_plain_bn_is_the_reference_with_gamma_one():
    model = build_model(config(), 3)
    expected, state = reference(3), model.state_dict()
    norms = norm_keys(model)
    shared = [key for key in state if key not in norms]
    assert len(shared) > 5 and "fc.weight" in shared
    assert all(torch.equal(state[key], expected[key]) for key in shared)
    gammas = [state[key] for key in norms if key.endswith(".weight")]
    assert gammas and all(torch.equal(g, torch.ones_like(g)) for g in gammas)  # BASE: γ0 = 1 on every BN
    variant = build_model(config(norm_layer="bn_uniform"), 3).state_dict()  # draws γ while it is built
    assert all(torch.equal(variant[key], state[key]) for key in shared)


def test_plain_bn_with_zeroed_last_gamma_and_cifar_stem():
    stem_config = config(model="resnet18", zero_init_last=True, cifar_stem=True)  # test_resnet has a deep stem
    model = build_model(stem_config, 3)
    expected, state = reference(3, "resnet18", zero_init_last=True), model.state_dict()
    with rng_scope(seed_for(SEED, "init-stem")):  # the stem's own stream: a fresh 3×3 conv, kaiming fan_in
        stem = nn.Conv2d(3, state["conv1.weight"].shape[0], 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_in", nonlinearity="relu")
    assert torch.equal(state["conv1.weight"], stem.weight) and isinstance(model.maxpool, nn.Identity)
    assert all(torch.equal(state[key], expected[key]) for key in state if key != "conv1.weight")  # γ zeroed too
    variant = build_model(replace(stem_config, norm_layer="bn_gamma01"), 3).state_dict()
    assert all(torch.equal(variant[key], state[key]) for key in state if key not in norm_keys(model))


@pytest.mark.parametrize("norm_layer", [None, "bn_gamma01"])
def test_pretrained_file_gives_everything_but_the_new_classifier(tmp_path, norm_layer):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=7).state_dict()  # another head: fc is not loaded
    save_file(source, str(tmp_path / "weights.safetensors"))
    model = build_model(config(pretrained_file=str(tmp_path / "weights.safetensors"), norm_layer=norm_layer), 3)
    state, expected = model.state_dict(), reference(3)
    assert torch.equal(state["fc.weight"], expected["fc.weight"]) and torch.equal(state["fc.bias"], expected["fc.bias"])
    loaded = [key for key in source if not key.startswith("fc.") and key in state]
    assert len(loaded) > 5 and all(torch.equal(state[key], source[key]) for key in loaded)
