"""The registered norm layers, read from timm-bninit's registry and sorted by kind, for tests to iterate.

Tests never copy a table of variants: a variant registered with ``register_norm_layer`` is in every test that
iterates :func:`names` (a built-in variant without a written-out reference formula then fails the formula tests,
which is the point). Read at collection time, so only the variants ``import timm_bninit`` registers; a test that
registers its own restores the registry afterwards.

Kinds, by what a layer's class is (as :func:`timm_bninit.sync.sync_kind` decides):

* ``"plain"``: plain BN at run time (the γ-init and uniform-γ variants): only the initialisation differs;
* ``"calibrated"``: a calibrating layer with its own forward (RBN, IEBN, blended-σ).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

import timm_bninit
from timm_bninit.norm import BatchNormVariant, _CalibratedBase

KINDS = ("plain", "calibrated")


def base_type(factory: Callable[..., nn.Module]) -> type:
    """The class a registered factory builds (a ``functools.partial`` is unwrapped)."""
    return factory.func if isinstance(factory, functools.partial) else factory


def kind_of(factory: Callable[..., nn.Module]) -> str:
    """``"plain"`` or ``"calibrated"`` (see the module docstring); fails for a class of neither kind."""
    layer_type = base_type(factory)
    if issubclass(layer_type, _CalibratedBase):
        return "calibrated"
    if issubclass(layer_type, BatchNormVariant) and layer_type.plain_bn_forward:
        return "plain"
    raise AssertionError(f"{layer_type.__name__} is neither plain BN at run time nor a calibrating layer")


def names(kind: str | None = None, of: type | tuple[type, ...] | None = None) -> list[str]:
    """Registered names, sorted; only those of ``kind``, and only those whose class is a subclass of ``of``."""
    assert kind is None or kind in KINDS, kind
    found = []
    for name in timm_bninit.list_norm_layers():
        factory = timm_bninit.get_norm_layer(name)
        if (kind is None or kind_of(factory) == kind) and (of is None or issubclass(base_type(factory), of)):
            found.append(name)
    return found


def distinct_forms(kind: str | None = None) -> list[str]:
    """One registered name per code path: the first name of each class and non-numeric options (``rbn`` and
    ``rbn_unit``, but one of the ``bn_gamma*`` names). For tests whose every case builds a model."""
    seen, found = set(), []
    for name in names(kind):
        factory = timm_bninit.get_norm_layer(name)
        keywords = getattr(factory, "keywords", {})
        key = (base_type(factory), tuple(sorted((k, v) for k, v in keywords.items() if isinstance(v, bool))))
        if key not in seen:
            seen.add(key)
            found.append(name)
    return found


def factory(name: str, fused: bool = False) -> Callable[..., nn.Module]:
    """The registered layer (or its fused norm+act twin) under ``name``."""
    return timm_bninit.get_norm_act_layer(name) if fused else timm_bninit.get_norm_layer(name)
