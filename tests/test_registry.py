"""Tests of the string registry that wires the timm-bninit layers into timm's norm and norm+act registries."""

from __future__ import annotations

import functools
import warnings
from collections import Counter

import pytest
import timm
import timm.layers
import torch
from timm.layers import BatchNormAct2d
from timm.layers import create_norm as timm_norm
from timm.layers import create_norm_act as timm_norm_act
from torch import nn
from variants import base_type, names

import timm_bninit
from timm_bninit import (
    BatchNormGamma2d,
    BatchNormGammaAct2d,
    BatchNormUniformGamma2d,
    BlendedStdBatchNorm2d,
    BlendedStdBatchNormAct2d,
    InstanceEnhancementBatchNorm2d,
    RepresentativeBatchNorm2d,
    RepresentativeBatchNormAct2d,
    UnknownNormLayerError,
    register_norm_layer,
)
from timm_bninit import registry as bninit_registry
from timm_bninit.norm import norm_act_type

# The grids the methods specify (docs/methods.md §1: γ0; §4: α); a registered name spells its value, bn_gamma025 = 0.25
GAMMA_GRID = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
BLEND_GRID = [0.1, 0.25, 0.5, 0.75, 0.9]
GAMMA_NAMES = names(of=BatchNormGamma2d)
BLEND_NAMES = names(of=BlendedStdBatchNorm2d)
CALIBRATED_NAMES = names(of=(RepresentativeBatchNorm2d, InstanceEnhancementBatchNorm2d))  # with and without _unit
BUILTIN_NAMES = names()


def value_in_name(name: str, prefix: str) -> float:
    """``bn_gamma025`` → 0.25, ``bn_gamma1`` → 1.0: the digits after ``prefix`` with the point after the first."""
    digits = name.removeprefix(prefix)
    return float(f"{digits[0]}.{digits[1:]}") if len(digits) > 1 else float(digits)


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def act_types(model: nn.Module) -> Counter:
    return Counter(type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d))


# ---- built-in names -----------------------------------------------------------------------------------------------


def test_all_builtin_names_registered():
    names = timm_bninit.list_norm_layers()
    assert len(BUILTIN_NAMES) == 17
    assert set(names) >= set(BUILTIN_NAMES)
    assert names == sorted(names)
    # the names are the methods' grids and forms, no more and no less
    assert sorted(value_in_name(name, "bn_gamma") for name in GAMMA_NAMES) == GAMMA_GRID
    assert sorted(value_in_name(name, "bn_blend") for name in BLEND_NAMES) == BLEND_GRID
    assert sorted(CALIBRATED_NAMES) == ["iebn", "iebn_unit", "rbn", "rbn_unit"]
    assert set(BUILTIN_NAMES) == {*GAMMA_NAMES, *BLEND_NAMES, *CALIBRATED_NAMES, "bn_uniform"}


@pytest.mark.parametrize("name", GAMMA_NAMES)
def test_gamma_names_build_their_gamma0(name):
    gamma_init = value_in_name(name, "bn_gamma")
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is BatchNormGamma2d
    assert layer.gamma_init == gamma_init and layer.gamma_lr_div == 100.0
    assert torch.all(layer.weight == gamma_init) and torch.all(layer.bias == 0)
    fused = timm.layers.get_norm_act_layer(name, act_layer=nn.SiLU)(8)
    assert type(fused) is BatchNormGammaAct2d and isinstance(fused.act, nn.SiLU)
    assert torch.all(fused.weight == gamma_init)


@pytest.mark.parametrize("name", BLEND_NAMES)
def test_blend_names_build_their_alpha(name):
    alpha = value_in_name(name, "bn_blend")
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is BlendedStdBatchNorm2d
    assert layer.prev_std_weight == alpha
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    fused = timm.layers.get_norm_act_layer(name, act_layer=nn.ReLU)(8)
    assert type(fused) is BlendedStdBatchNormAct2d and fused.prev_std_weight == alpha


@pytest.mark.parametrize("name", CALIBRATED_NAMES)
def test_calibrated_names_build_their_identity_init(name):
    plain, identity_init = base_type(timm_bninit.get_norm_layer(name)), name.endswith("_unit")
    # a built-in keeps its own fused class, named after it: RepresentativeBatchNorm2d -> RepresentativeBatchNormAct2d
    fused_type = getattr(timm_bninit, plain.__name__.replace("BatchNorm2d", "BatchNormAct2d"))
    assert norm_act_type(plain) is fused_type
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is plain and layer.identity_init is identity_init
    assert (layer.initial_scale == 1.0) is identity_init
    fused = timm_bninit.get_norm_act_layer(name)(8, act_layer=nn.SiLU)
    assert type(fused) is fused_type and fused.identity_init is identity_init and isinstance(fused.act, nn.SiLU)


def test_variant_types_are_read_from_the_registrations(restore_registries):
    builtin = {base_type(timm_bninit.get_norm_layer(name)) for name in BUILTIN_NAMES}
    assert {cls: norm_act_type(cls) for cls in builtin} == timm_bninit.VARIANT_TYPES

    class OwnGamma2d(BatchNormGamma2d):
        pass

    register_norm_layer("own_gamma", OwnGamma2d)
    assert timm_bninit.VARIANT_TYPES[OwnGamma2d] is norm_act_type(OwnGamma2d)
    assert norm_act_type(OwnGamma2d).__name__ == "OwnGammaAct2d"


def test_uniform_name():
    layer = timm.layers.get_norm_layer("bn_uniform")(64)
    assert type(layer) is BatchNormUniformGamma2d
    assert torch.all((layer.weight >= 0) & (layer.weight < 1)) and layer.weight.unique().numel() > 1


def test_timm_resolves_names_as_timm_spells_them():
    factory = timm.layers.get_norm_layer("bn_gamma01")
    assert factory is timm_bninit.get_norm_layer("bn_gamma01")
    # timm strips '_' and lower-cases
    assert timm.layers.get_norm_layer("BN_Gamma_01") is factory
    assert timm.layers.get_norm_layer("bngamma01") is factory
    assert timm_bninit.get_norm_layer("BNGamma01") is factory
    assert torch.all(timm.layers.create_norm_layer("bn_gamma01", 4).weight == 0.1)


# ---- unknown names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
def test_misspelt_name_through_create_model(model_name):
    with pytest.raises(UnknownNormLayerError) as info:
        timm.create_model(model_name, norm_layer="bn_gama01")
    message = str(info.value)
    assert isinstance(info.value, KeyError)  # what timm's own lookup raised: callers catching KeyError still work
    assert "Did you mean 'bn_gamma01'" in message
    assert "Known:" in message
    known = message.split("Known:", 1)[1]
    for name in BUILTIN_NAMES:
        assert name in known, name
    assert "batchnorm" in known  # timm's own names are listed too


def test_misspelt_name_through_timm_bninit():
    with pytest.raises(UnknownNormLayerError, match=r"unknown norm layer 'bn_gama01'\..*Did you mean 'bn_gamma01'"):
        timm_bninit.get_norm_layer("bn_gama01")
    with pytest.raises(UnknownNormLayerError, match="Known: bn_blend01, "):
        timm_bninit.get_norm_act_layer("no_such_norm")


# ---- (re-)registration --------------------------------------------------------------------------------------------


def test_reregistering_warns_and_new_layer_wins(restore_registries):
    with pytest.warns(UserWarning, match="'bn_gamma01'.*overwrites"):
        register_norm_layer("bn_gamma01", functools.partial(BatchNormGamma2d, gamma_init=0.3))
    resnet = timm.create_model("resnet18", norm_layer="bn_gamma01", zero_init_last=False, num_classes=4)
    assert all(type(m) is BatchNormGamma2d and torch.all(m.weight == 0.3) for m in batch_norms(resnet))
    effnet = timm.create_model("efficientnet_b0", norm_layer="bn_gamma01", num_classes=4)
    assert all(type(m) is BatchNormGammaAct2d and m.gamma_init == 0.3 for m in batch_norms(effnet))
    assert isinstance(effnet.bn1.act, nn.SiLU)

    restore_registries()
    assert torch.all(timm.layers.get_norm_layer("bn_gamma01")(4).weight == 0.1)
    assert timm.layers.get_norm_act_layer("bn_gamma01", act_layer=nn.SiLU)(4).gamma_init == 0.1


def test_reregistering_under_another_spelling_replaces_the_old_name(restore_registries):
    with pytest.warns(UserWarning, match="overwrites the existing registration of 'bn_gamma01'"):
        register_norm_layer("BN_Gamma_01", functools.partial(BatchNormGamma2d, gamma_init=0.4))
    names = timm_bninit.list_norm_layers()
    assert "BN_Gamma_01" in names and "bn_gamma01" not in names
    assert torch.all(timm.layers.get_norm_layer("bn_gamma01")(4).weight == 0.4)


def test_registering_over_a_timm_name_warns(restore_registries):
    with pytest.warns(UserWarning, match="overwrites"):
        register_norm_layer("batch_norm_2d", BatchNormGamma2d)
    assert timm.layers.get_norm_layer("batchnorm2d") is BatchNormGamma2d


class _ThirdPartyBatchNorm(nn.BatchNorm2d):
    """A BN layer with no fused norm+act twin."""


def test_reregistering_without_fused_twin_does_not_leave_stale_twin(restore_registries):
    with pytest.warns(UserWarning, match="overwrites"):
        register_norm_layer("rbn", _ThirdPartyBatchNorm)
    assert type(timm.create_model("resnet18", norm_layer="rbn", num_classes=4).bn1) is _ThirdPartyBatchNorm
    try:
        model = timm.create_model("efficientnet_b0", norm_layer="rbn", num_classes=4)
    except LookupError as err:  # refusing is correct: the new 'rbn' has no norm+act form
        assert "rbn" in str(err)
    else:
        stale = (RepresentativeBatchNorm2d, RepresentativeBatchNormAct2d)
        assert not any(isinstance(m, stale) for m in model.modules()), \
            "efficientnet built the *previous* 'rbn' registration"


def test_layer_without_fused_twin_is_refused_by_norm_act_families(restore_registries):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_norm_layer("third_party_bn", _ThirdPartyBatchNorm)
    assert type(timm.create_model("resnet18", norm_layer="third_party_bn", num_classes=4).bn1) is _ThirdPartyBatchNorm
    with pytest.raises(UnknownNormLayerError, match="unknown norm\\+act layer 'thirdpartybn'"):
        timm.create_model("efficientnet_b0", norm_layer="third_party_bn", num_classes=4)
    with pytest.raises(UnknownNormLayerError, match="no fused norm\\+act twin"):
        timm_bninit.get_norm_act_layer("third_party_bn")


def test_custom_partial_through_create_model(restore_registries):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new name: no overwrite warning
        register_norm_layer("bn_gamma02", functools.partial(BatchNormGamma2d, gamma_init=0.2))
    assert "bn_gamma02" in timm_bninit.list_norm_layers()
    x = torch.randn(2, 3, 32, 32)

    resnet = timm.create_model("resnet18", norm_layer="bn_gamma02", zero_init_last=False, num_classes=4)
    norms = batch_norms(resnet)
    assert len(norms) == 20
    assert all(type(m) is BatchNormGamma2d and torch.all(m.weight == 0.2) for m in norms)
    assert sum(isinstance(m, nn.ReLU) for m in resnet.modules()) > 0
    resnet(x).sum().backward()

    effnet = timm.create_model("efficientnet_b0", norm_layer="bn_gamma02", num_classes=4)
    norms = batch_norms(effnet)
    assert norms and all(type(m) is BatchNormGammaAct2d and m.gamma_init == 0.2 for m in norms)
    # activation preserved: the fused layers carry exactly the stock model's activations (SiLU), no ReLU anywhere
    assert act_types(effnet) == act_types(timm.create_model("efficientnet_b0", num_classes=4))
    assert isinstance(effnet.bn1.act, nn.SiLU) and not any(isinstance(m, nn.ReLU) for m in effnet.modules())
    # EfficientNet's own init sets every BN γ to 1 (docs/methods.md §1): γ0 is re-applied by reset_affine_parameters
    for m in norms:
        m.reset_affine_parameters()
    assert all(torch.all(m.weight == 0.2) for m in norms)
    effnet(x).sum().backward()

    restore_registries()
    assert "bn_gamma02" not in timm_bninit.list_norm_layers()


@pytest.mark.parametrize("norm_layer", [functools.partial(BatchNormGamma2d, gamma_init=0.2),
                                        *sorted({base_type(timm_bninit.get_norm_layer(name)) for name in BUILTIN_NAMES},
                                                key=lambda cls: cls.__name__)])
def test_norm_act_families_accept_the_classes_themselves(norm_layer):
    """Given a class (not a name), timm finds the fused twin by class name and still passes the family's act."""
    model = timm.create_model("efficientnet_b0", norm_layer=norm_layer, num_classes=4)
    norms = batch_norms(model)
    assert norms and all(type(m) is norm_act_type(base_type(norm_layer)) for m in norms)
    assert act_types(model) == act_types(timm.create_model("efficientnet_b0", num_classes=4))
    if isinstance(norm_layer, functools.partial):
        assert all(m.gamma_init == 0.2 for m in norms)


# ---- timm's private registries ------------------------------------------------------------------------------------


def test_timm_private_registries_keep_their_shape(restore_registries):
    """timm has no public register function: fail loudly here if the private registries written into change."""
    assert isinstance(timm_norm._NORM_MAP, dict)
    assert isinstance(timm_norm._NORM_TYPES, set)
    assert isinstance(timm_norm_act._NORM_ACT_MAP, dict)
    assert isinstance(timm_norm_act._NORM_ACT_TYPES, set)
    assert isinstance(timm_norm_act._NORM_ACT_REQUIRES_ARG, set)
    assert isinstance(timm_norm_act._NORM_TO_NORM_ACT_MAP, dict)
    assert timm.layers.get_norm_layer is timm_norm.get_norm_layer
    assert timm.layers.get_norm_act_layer is timm_norm_act.get_norm_act_layer

    # behavioural probe: a key written into _NORM_MAP is found under any '_'/case spelling
    class ProbeNorm(nn.BatchNorm2d):
        pass

    class ProbeNormAct(BatchNormAct2d):
        pass

    timm_norm._NORM_MAP["bninitprobe"] = ProbeNorm
    assert timm.layers.get_norm_layer("BnInit_Probe") is ProbeNorm
    # _NORM_ACT_MAP is looked up the same way; membership in _NORM_ACT_REQUIRES_ARG makes timm bind act_layer
    timm_norm_act._NORM_ACT_MAP["bninitprobe"] = ProbeNormAct
    timm_norm_act._NORM_ACT_REQUIRES_ARG.add(ProbeNormAct)
    resolved = timm.layers.get_norm_act_layer("BnInit_Probe", act_layer=nn.SiLU)
    assert isinstance(resolved, functools.partial) and resolved.func is ProbeNormAct
    assert resolved.keywords == {"act_layer": nn.SiLU}
    assert isinstance(resolved(4).act, nn.SiLU)
    # a class is mapped to its fused twin through _NORM_TO_NORM_ACT_MAP, keyed by lower-cased class name
    timm_norm_act._NORM_TO_NORM_ACT_MAP["probenorm"] = ProbeNormAct
    resolved = timm.layers.get_norm_act_layer(ProbeNorm, act_layer=nn.SiLU)
    assert resolved.func is ProbeNormAct and resolved.keywords == {"act_layer": nn.SiLU}


def test_builtin_registrations_are_in_timm_registries():
    for name in BUILTIN_NAMES:
        key = name.replace("_", "").lower()
        assert key == bninit_registry.timm_key(name)
        assert timm_norm._NORM_MAP[key] is timm_bninit.get_norm_layer(name)
        assert timm_norm_act._NORM_ACT_MAP[key] is timm_bninit.get_norm_act_layer(name)
        assert timm_bninit.get_norm_act_layer(name) in timm_norm_act._NORM_ACT_REQUIRES_ARG
