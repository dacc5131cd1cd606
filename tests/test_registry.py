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

import timm_bninit
from timm_bninit import (
    BatchNormGamma2d,
    BatchNormGammaAct2d,
    BatchNormUniformGamma2d,
    BlendedStdBatchNorm2d,
    BlendedStdBatchNormAct2d,
    InstanceEnhancementBatchNorm2d,
    InstanceEnhancementBatchNormAct2d,
    RepresentativeBatchNorm2d,
    RepresentativeBatchNormAct2d,
    UnknownNormLayerError,
    register_norm_layer,
)
from timm_bninit import registry as bninit_registry

GAMMA_NAMES = {"bn_gamma001": 0.01, "bn_gamma005": 0.05, "bn_gamma01": 0.1, "bn_gamma025": 0.25, "bn_gamma05": 0.5,
               "bn_gamma075": 0.75, "bn_gamma1": 1.0}
BLEND_NAMES = {"bn_blend01": 0.1, "bn_blend025": 0.25, "bn_blend05": 0.5, "bn_blend075": 0.75, "bn_blend09": 0.9}
CALIBRATED_NAMES = {  # name -> (plain class, fused class, identity_init)
    "rbn": (RepresentativeBatchNorm2d, RepresentativeBatchNormAct2d, False),
    "rbn_unit": (RepresentativeBatchNorm2d, RepresentativeBatchNormAct2d, True),
    "iebn": (InstanceEnhancementBatchNorm2d, InstanceEnhancementBatchNormAct2d, False),
    "iebn_unit": (InstanceEnhancementBatchNorm2d, InstanceEnhancementBatchNormAct2d, True),
}
BUILTIN_NAMES = {*GAMMA_NAMES, *BLEND_NAMES, *CALIBRATED_NAMES, "bn_uniform"}


@pytest.fixture
def restore_registries():
    """Snapshot timm-bninit's and timm's registries; the returned function (also run at teardown) puts them back.

    Restores in place: timm's functions read the module globals, and timm-bninit replaced the dicts with subclasses.
    """
    containers = [bninit_registry._REGISTRY, timm_norm._NORM_MAP, timm_norm._NORM_TYPES, timm_norm_act._NORM_ACT_MAP,
                  timm_norm_act._NORM_ACT_TYPES, timm_norm_act._NORM_TO_NORM_ACT_MAP,
                  timm_norm_act._NORM_ACT_REQUIRES_ARG]
    saved = [container.copy() for container in containers]

    def restore():
        for container, copy in zip(containers, saved):
            container.clear()
            container.update(copy)

    yield restore
    restore()


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def act_types(model: nn.Module) -> Counter:
    return Counter(type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d))


# ---- built-in names -----------------------------------------------------------------------------------------------


def test_all_builtin_names_registered():
    names = timm_bninit.list_norm_layers()
    assert len(BUILTIN_NAMES) == 17
    assert set(names) >= BUILTIN_NAMES
    assert names == sorted(names)


@pytest.mark.parametrize(("name", "gamma_init"), list(GAMMA_NAMES.items()))
def test_gamma_names_build_their_gamma0(name, gamma_init):
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is BatchNormGamma2d
    assert layer.gamma_init == gamma_init and layer.gamma_lr_div == 100.0
    assert torch.all(layer.weight == gamma_init) and torch.all(layer.bias == 0)
    fused = timm.layers.get_norm_act_layer(name, act_layer=nn.SiLU)(8)
    assert type(fused) is BatchNormGammaAct2d and isinstance(fused.act, nn.SiLU)
    assert torch.all(fused.weight == gamma_init)


@pytest.mark.parametrize(("name", "alpha"), list(BLEND_NAMES.items()))
def test_blend_names_build_their_alpha(name, alpha):
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is BlendedStdBatchNorm2d
    assert layer.prev_std_weight == alpha
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    fused = timm.layers.get_norm_act_layer(name, act_layer=nn.ReLU)(8)
    assert type(fused) is BlendedStdBatchNormAct2d and fused.prev_std_weight == alpha


@pytest.mark.parametrize("name", list(CALIBRATED_NAMES))
def test_calibrated_names_build_their_identity_init(name):
    plain, fused_type, identity_init = CALIBRATED_NAMES[name]
    layer = timm.layers.get_norm_layer(name)(8)
    assert type(layer) is plain and layer.identity_init is identity_init
    assert (layer.initial_scale == 1.0) is identity_init
    fused = timm_bninit.get_norm_act_layer(name)(8, act_layer=nn.SiLU)
    assert type(fused) is fused_type and fused.identity_init is identity_init and isinstance(fused.act, nn.SiLU)


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


@pytest.mark.parametrize("norm_layer", [functools.partial(BatchNormGamma2d, gamma_init=0.2), RepresentativeBatchNorm2d])
def test_norm_act_families_accept_the_classes_themselves(norm_layer):
    """Given a class (not a name), timm finds the fused twin by class name and still passes the family's act."""
    model = timm.create_model("efficientnet_b0", norm_layer=norm_layer, num_classes=4)
    base = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
    norms = batch_norms(model)
    assert norms and all(type(m) is timm_bninit.VARIANT_TYPES[base] for m in norms)
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
