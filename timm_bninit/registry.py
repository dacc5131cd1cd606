"""String registry of the timm-bninit norm layers, wired into timm's own norm and norm+act registries.

timm has no public register function: ``timm.layers.get_norm_layer`` looks a string up in the private dict
``timm.layers.create_norm._NORM_MAP`` (after stripping ``_`` and lower-casing), and the families built from fused
norm+act layers (efficientnet, regnet, resnetv2, ...) look it up in ``timm.layers.create_norm_act._NORM_ACT_MAP``.
:func:`register_norm_layer` writes both, and checks their shape first so that a timm release that changes them fails
loudly at import instead of silently building plain BN.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from timm.layers import create_norm as _timm_norm
from timm.layers import create_norm_act as _timm_norm_act
from torch import nn

from .errors import BNInitError, did_you_mean
from .norm import (
    BatchNormGamma2d,
    BatchNormUniformGamma2d,
    BlendedStdBatchNorm2d,
    InstanceEnhancementBatchNorm2d,
    RepresentativeBatchNorm2d,
    norm_act_type,
)

__all__ = [
    "UnknownNormLayerError",
    "register_norm_layer",
    "list_norm_layers",
    "get_norm_layer",
    "get_norm_act_layer",
    "resolve_norm_layer",
    "fused_twin",
    "timm_key",
    "variant_types",
]

LayerFactory = type[nn.Module] | functools.partial | Callable[..., nn.Module]

# canonical name -> (norm layer, fused norm+act layer or None)
_REGISTRY: dict[str, tuple[LayerFactory, LayerFactory | None]] = {}


class UnknownNormLayerError(BNInitError, KeyError):
    """An unknown norm-layer name; the message lists the known names (``str`` is not quoted like a KeyError's)."""


def timm_key(name: str) -> str:
    """The key timm looks a norm-layer string up under: ``'bn_gamma01'`` -> ``'bngamma01'``."""
    return name.replace("_", "").lower()


class _ExplainingMap(dict):
    """timm's registry dict, with a lookup error that lists the known names instead of ``KeyError: 'bngama01'``."""

    kind = "norm layer"

    def __missing__(self, key: str) -> Any:
        raise UnknownNormLayerError(_unknown_message(key, self, self.kind))


class _ExplainingNormActMap(_ExplainingMap):
    kind = "norm+act layer"


def _unknown_message(name: str, timm_map: dict, kind: str) -> str:
    ours = {timm_key(n): n for n in _REGISTRY}
    known = sorted({ours.get(k, k) for k in timm_map})
    hint = did_you_mean(name, [ours.get(k, k) for k in timm_map], key=timm_key)
    return (f"unknown {kind} {name!r} (timm strips '_' and lower-cases names). {hint} "
            f"Known: {', '.join(known)}. timm-bninit variants are registered by `import timm_bninit`.")


def _check_timm_registries() -> None:
    """Fail loudly if timm's private registries no longer have the shape this module writes into."""
    problems = []
    for module, attr, kind in (
        (_timm_norm, "_NORM_MAP", dict),
        (_timm_norm_act, "_NORM_ACT_MAP", dict),
        (_timm_norm_act, "_NORM_TO_NORM_ACT_MAP", dict),
        (_timm_norm_act, "_NORM_ACT_REQUIRES_ARG", set),
        (_timm_norm_act, "_NORM_ACT_TYPES", set),
        (_timm_norm, "_NORM_TYPES", set),
    ):
        if not isinstance(getattr(module, attr, None), kind):
            problems.append(f"{module.__name__}.{attr} is not a {kind.__name__}")
    for module, attr in ((_timm_norm, "get_norm_layer"), (_timm_norm_act, "get_norm_act_layer")):
        if not callable(getattr(module, attr, None)):
            problems.append(f"{module.__name__}.{attr} is missing")
    if problems:
        import timm

        raise ImportError(f"timm {timm.__version__} changed the norm-layer registries timm-bninit writes into: "
                          f"{'; '.join(problems)}. Install a timm version listed in timm-bninit's pyproject.toml.")


def _install_explaining_maps() -> None:
    if not isinstance(_timm_norm._NORM_MAP, _ExplainingMap):
        _timm_norm._NORM_MAP = _ExplainingMap(_timm_norm._NORM_MAP)
    if not isinstance(_timm_norm_act._NORM_ACT_MAP, _ExplainingNormActMap):
        _timm_norm_act._NORM_ACT_MAP = _ExplainingNormActMap(_timm_norm_act._NORM_ACT_MAP)


def _base_type(layer: LayerFactory) -> Any:
    return layer.func if isinstance(layer, functools.partial) else layer


def fused_twin(layer: LayerFactory) -> LayerFactory | None:
    """The norm+act layer matching ``layer`` (same kwargs) for a timm-bninit layer class or any subclass of one
    (:func:`timm_bninit.norm.norm_act_type`); None for other layers."""
    twin = norm_act_type(_base_type(layer))
    if twin is None:
        return None
    if isinstance(layer, functools.partial):
        return functools.partial(twin, *layer.args, **layer.keywords)
    return twin


def register_norm_layer(name: str, layer: LayerFactory, norm_act_layer: LayerFactory | None = None) -> None:
    """Register ``layer`` under ``name`` with timm, so ``timm.create_model(..., norm_layer=name)`` builds it.

    Args:
        name: the name users pass; timm matches it with ``_`` removed and lower-cased.
        layer: a class or ``functools.partial`` called as ``layer(num_features, device=..., dtype=...)``.
        norm_act_layer: the fused norm+act layer for families built through timm's norm+act registry. Derived
            automatically for timm-bninit's layers and every subclass of one (:func:`fused_twin`); without one,
            those families cannot use ``name``.

    Example::

        register_norm_layer("bn_gamma02", functools.partial(BatchNormGamma2d, gamma_init=0.2))
        register_norm_layer("scaled_bn", ScaledBatchNorm2d)  # a CalibratedBatchNorm2d subclass of your own
    """
    _check_timm_registries()
    _install_explaining_maps()
    key = timm_key(name)
    norm_act_layer = norm_act_layer if norm_act_layer is not None else fused_twin(layer)
    clash = [n for n in _REGISTRY if timm_key(n) == key and n != name]
    if name in _REGISTRY or clash or key in _timm_norm._NORM_MAP:
        previous = name if name in _REGISTRY else (clash[0] if clash else key)
        warnings.warn(f"norm layer {name!r} (timm key {key!r}) overwrites the existing registration of "
                      f"{previous!r}", stacklevel=2)
        for other in clash:
            del _REGISTRY[other]
    _REGISTRY[name] = (layer, norm_act_layer)
    _timm_norm._NORM_MAP[key] = layer
    _timm_norm._NORM_TYPES.add(_base_type(layer))
    if norm_act_layer is None:
        # no fused twin: norm+act families must refuse the name rather than keep building an earlier registration
        stale = _timm_norm_act._NORM_ACT_MAP.pop(key, None)
        class_key = _base_type(layer).__name__.lower()
        if stale is not None and _timm_norm_act._NORM_TO_NORM_ACT_MAP.get(class_key) is _base_type(stale):
            del _timm_norm_act._NORM_TO_NORM_ACT_MAP[class_key]
    else:
        _timm_norm_act._NORM_ACT_MAP[key] = norm_act_layer
        # timm passes the family's act_layer only to layers in this set; without it EfficientNet would get ReLU
        _timm_norm_act._NORM_ACT_REQUIRES_ARG.add(norm_act_layer)
        _timm_norm_act._NORM_ACT_REQUIRES_ARG.add(_base_type(norm_act_layer))
        _timm_norm_act._NORM_ACT_TYPES.add(_base_type(norm_act_layer))
        # models given the class itself (norm_layer=BatchNormGamma2d) find the fused twin by class name
        _timm_norm_act._NORM_TO_NORM_ACT_MAP[_base_type(layer).__name__.lower()] = _base_type(norm_act_layer)


def variant_types() -> dict[type, type]:
    """Each registered layer class with its fused norm+act twin, derived from the registrations (classes without a
    twin are left out)."""
    return {_base_type(norm): _base_type(norm_act) for norm, norm_act in _REGISTRY.values() if norm_act is not None}


def list_norm_layers() -> list[str]:
    """Names of the norm layers registered through timm-bninit, sorted."""
    return sorted(_REGISTRY)


def resolve_norm_layer(name: str) -> tuple[LayerFactory, LayerFactory | None]:
    """The (norm layer, fused norm+act layer or None) registered under ``name``, matched as timm matches names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    by_key = {timm_key(n): n for n in _REGISTRY}
    if timm_key(name) in by_key:
        return _REGISTRY[by_key[timm_key(name)]]
    hint = did_you_mean(name, list_norm_layers(), key=timm_key)
    raise UnknownNormLayerError(f"unknown norm layer {name!r}. {hint} Known: {', '.join(list_norm_layers())}")


def get_norm_layer(name: str) -> LayerFactory:
    """The layer factory registered under ``name`` (timm-bninit variants only)."""
    return resolve_norm_layer(name)[0]


def get_norm_act_layer(name: str) -> LayerFactory:
    """The fused norm+act factory registered under ``name``."""
    norm_act = resolve_norm_layer(name)[1]
    if norm_act is None:
        raise UnknownNormLayerError(f"norm layer {name!r} has no fused norm+act twin registered")
    return norm_act


GAMMA_INITS = {
    "bn_gamma001": 0.01,
    "bn_gamma005": 0.05,
    "bn_gamma01": 0.1,
    "bn_gamma025": 0.25,
    "bn_gamma05": 0.5,
    "bn_gamma075": 0.75,
    "bn_gamma1": 1.0,
}
BLEND_WEIGHTS = {
    "bn_blend01": 0.1,
    "bn_blend025": 0.25,
    "bn_blend05": 0.5,
    "bn_blend075": 0.75,
    "bn_blend09": 0.9,
}


def _register_builtin() -> None:
    for name, gamma_init in GAMMA_INITS.items():
        register_norm_layer(name, functools.partial(BatchNormGamma2d, gamma_init=gamma_init))
    register_norm_layer("bn_uniform", BatchNormUniformGamma2d)
    register_norm_layer("rbn", RepresentativeBatchNorm2d)
    register_norm_layer("rbn_unit", functools.partial(RepresentativeBatchNorm2d, identity_init=True))
    register_norm_layer("iebn", InstanceEnhancementBatchNorm2d)
    register_norm_layer("iebn_unit", functools.partial(InstanceEnhancementBatchNorm2d, identity_init=True))
    for name, weight in BLEND_WEIGHTS.items():
        register_norm_layer(name, functools.partial(BlendedStdBatchNorm2d, prev_std_weight=weight))
