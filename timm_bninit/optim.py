"""Optimizer parameter groups for the γ-init method (Davis & Frank): γ trains at base_lr / c, without weight decay."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BNInitValueError
from .gammas import bn_gammas

__all__ = ["param_groups", "param_group_fn", "gamma_lr_div_of"]


def gamma_lr_div_of(module: nn.Module, override: float | None = None) -> float | None:
    """The γ learning-rate divisor of a BN-type module (``None`` if ``module`` is not BN-type).

    timm-bninit variants (and their SyncBatchNorm forms) carry their own ``gamma_lr_div``; plain BN has 1.
    ``override`` replaces both, which is how the method is applied to plain BN (e.g. a pretrained model with
    ``bn_transfer='keep'``).
    """
    if not isinstance(module, _BatchNorm):
        return None
    if override is not None:
        return float(override)
    return float(getattr(module, "gamma_lr_div", 1.0))


def param_groups(model: nn.Module, weight_decay: float | None = None, *, lr: float | None = None,
                 gamma_lr_div: float | None = None) -> list[dict[str, Any]]:
    """Split ``model`` into the method's optimizer groups.

    * ``decay``: conv/linear weights and every other parameter with more than one dimension (except those the model
      lists in ``no_weight_decay()``), with weight decay.
    * ``no_decay``: biases, BN β, RBN/IEBN calibration parameters and other 1-D parameters, without weight decay.
    * ``bn_gamma`` (one group per distinct divisor c): every BN γ, without weight decay, at base_lr / c.

    Frozen parameters (``requires_grad=False``) are left out. Empty groups are dropped.

    Two ways to express base_lr / c, because schedulers differ (use exactly one, never both):

    * ``lr=None`` (timm convention): γ groups carry ``lr_scale = 1/c`` and no ``lr`` of their own. timm's schedulers
      multiply every value they set (warmup, cosine floor included) by ``lr_scale``, so γ keeps exactly 1/c of the
      scheduled rate at every step. Use with ``timm.optim.create_optimizer_v2(..., param_group_fn=...)`` and a timm
      scheduler, which applies the scale when it is created.
    * ``lr=base_lr`` (torch convention): every group gets an explicit ``lr`` (γ: base_lr / c), no ``lr_scale``.
      torch's multiplicative schedulers (LambdaLR, StepLR, CosineAnnealingLR with ``eta_min=0``, ...) then keep the
      ratio exactly; so does a plain optimizer with no scheduler.

    Args:
        model: the model.
        weight_decay: decay for the ``decay`` group; ``None`` leaves it to the optimizer's default.
        lr: base learning rate for the torch convention (see above).
        gamma_lr_div: c for every BN γ, plain BN included; ``None`` uses each layer's own (variants carry theirs,
            plain BN has 1).

    Example::

        optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4,
                                                   param_group_fn=param_group_fn(weight_decay=1e-4))
    """
    if gamma_lr_div is not None and not gamma_lr_div > 0:
        raise BNInitValueError(f"gamma_lr_div must be > 0, got {gamma_lr_div}")
    no_weight_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    gamma_ids = {id(gamma): gamma_lr_div_of(module, gamma_lr_div) for _, module, gamma in bn_gammas(model)}
    decay, no_decay, gamma_by_div = [], [], {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in gamma_ids:
            gamma_by_div.setdefault(gamma_ids[id(param)], []).append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay:
            no_decay.append(param)
        else:
            decay.append(param)

    return _with_lr(_groups(decay, no_decay, gamma_by_div, weight_decay), lr)


def _groups(decay: list, no_decay: list, gamma_by_div: dict[float, list], weight_decay: float | None) -> list[dict]:
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"name": "decay", "params": decay})
        if weight_decay is not None:
            groups[-1]["weight_decay"] = weight_decay
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    for divisor, params in sorted(gamma_by_div.items()):
        name = "bn_gamma" if len(gamma_by_div) == 1 else f"bn_gamma_div{divisor:g}"
        groups.append({"name": name, "params": params, "weight_decay": 0.0, "gamma_lr_div": divisor})
    return groups


def _with_lr(groups: list[dict[str, Any]], lr: float | None) -> list[dict[str, Any]]:
    """γ's rate as an explicit ``lr`` (torch convention) or as ``lr_scale`` (timm's), never both."""
    for group in groups:
        divisor = group.get("gamma_lr_div", 1.0)
        if lr is not None:
            group["lr"] = lr / divisor
        elif "gamma_lr_div" in group:
            group["lr_scale"] = 1.0 / divisor
    return groups


def param_group_fn(weight_decay: float | None = None, *, lr: float | None = None,
                   gamma_lr_div: float | None = None) -> functools.partial:
    """:func:`param_groups` bound to its options, in the one-argument form timm's ``param_group_fn`` expects."""
    return functools.partial(param_groups, weight_decay=weight_decay, lr=lr, gamma_lr_div=gamma_lr_div)
