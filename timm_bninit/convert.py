"""Model surgery: swap the BatchNorm layers of an existing model for a variant, and recalibrate BN statistics.

``bn_transfer`` says what a pretrained γ becomes in the new layer:

* ``keep``: the pretrained γ (the converted model computes exactly what the original did, for variants whose
  forward is BN at init);
* ``reset``: the variant's own initial γ (γ0, U(0, 1), or 1 for RBN/IEBN);
* ``scale``: γ · γ0.

Running statistics, β and ``requires_grad`` flags are always carried over. A policy that changes γ changes the scale
of every downstream activation, so downstream running statistics no longer match (docs/methods.md §9): pass
``calibration_batches`` to recalibrate them, or call :func:`recalibrate_bn_stats` before evaluating.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import STALE_STATISTICS, BNInitError, BNInitTypeError, BNInitValueError
from .norm import BatchNormVariant
from .registry import LayerFactory, fused_twin, resolve_norm_layer

__all__ = ["BN_TRANSFER_POLICIES", "BNTransferWarning", "UnknownPolicyError", "convert_norm", "recalibrate_bn_stats",
           "transfer_gamma"]

BN_TRANSFER_POLICIES = ("keep", "reset", "scale")


class UnknownPolicyError(BNInitError, ValueError):
    """A ``bn_transfer`` policy that does not exist; the message lists the policies."""


class BNTransferWarning(UserWarning):
    """A transfer policy changed pretrained γ: downstream running statistics are stale until recalibrated."""


def check_bn_transfer(bn_transfer: str) -> None:
    if bn_transfer not in BN_TRANSFER_POLICIES:
        raise UnknownPolicyError(f"unknown bn_transfer {bn_transfer!r}; choose one of "
                                 f"{', '.join(BN_TRANSFER_POLICIES)}")


def transfer_gamma(pretrained_gamma: torch.Tensor, layer: nn.Module, bn_transfer: str) -> torch.Tensor | None:
    """The γ ``layer`` should hold under ``bn_transfer`` given a pretrained γ (``None``: keep the layer's own init).

    Raises:
        ValueError: ``scale`` for a layer whose γ0 is not a single number (``bn_uniform``).
    """
    check_bn_transfer(bn_transfer)
    if bn_transfer == "keep":
        return pretrained_gamma
    if bn_transfer == "reset":
        return None
    gamma_init = layer.gamma_init_value if isinstance(layer, BatchNormVariant) else 1.0
    if gamma_init is None:
        raise BNInitValueError(f"bn_transfer='scale' needs a numeric γ0 but {type(layer).__name__} has none "
                         f"(its γ starts random); use 'keep' or 'reset'")
    return pretrained_gamma * gamma_init


def _resolve_factories(norm_layer: str | LayerFactory, layer_kwargs: dict[str, Any]
                       ) -> tuple[LayerFactory, LayerFactory | None]:
    if isinstance(norm_layer, str):
        norm, norm_act = resolve_norm_layer(norm_layer)
    else:
        norm, norm_act = norm_layer, fused_twin(norm_layer)
    if layer_kwargs:
        norm = functools.partial(norm, **layer_kwargs)
        norm_act = functools.partial(norm_act, **layer_kwargs) if norm_act is not None else None
    return norm, norm_act


def _is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm)


def _build_like(old: nn.BatchNorm2d, norm: LayerFactory, norm_act: LayerFactory | None) -> nn.BatchNorm2d:
    reference = old.running_mean if old.running_mean is not None else old.bias
    factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    common = {"eps": old.eps, "momentum": old.momentum, "track_running_stats": old.track_running_stats, **factory}
    if isinstance(old, BatchNormAct2d):
        if norm_act is None:
            raise BNInitValueError(f"{type(old).__name__} fuses BN with an activation, but the target norm layer has "
                                   f"no fused norm+act twin; register one with register_norm_layer(..., "
                                   f"norm_act_layer=...)")
        new = norm_act(old.num_features, apply_act=False, **common)
        new.act, new.drop = old.act, old.drop  # keep the family's own activation and drop path
    else:
        new = norm(old.num_features, **common)
    return new


@torch.no_grad()
def _copy_state(old: nn.BatchNorm2d, new: nn.BatchNorm2d, bn_transfer: str) -> bool:
    """Copy statistics, β, γ (per policy) and matching extra tensors; return whether γ differs from the source."""
    if old.track_running_stats and new.track_running_stats:
        new.running_mean.copy_(old.running_mean)
        new.running_var.copy_(old.running_var)
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    if old.bias is not None and new.bias is not None:
        new.bias.copy_(old.bias)
        new.bias.requires_grad_(old.bias.requires_grad)
    for name in getattr(new, "extra_tensor_names", ()):
        source, target = getattr(old, name, None), getattr(new, name, None)
        if source is not None and target is not None and source.shape == target.shape:
            target.copy_(source)
    old_gamma = old.weight if isinstance(old.weight, nn.Parameter) else None
    new_gamma = new.weight if isinstance(new.weight, nn.Parameter) else None
    if old_gamma is None:
        return False
    if new_gamma is None:  # the blended-σ layer has no γ
        return not torch.allclose(old_gamma, torch.ones_like(old_gamma))
    new_gamma.requires_grad_(old_gamma.requires_grad)
    gamma = transfer_gamma(old_gamma.detach(), new, bn_transfer)
    if gamma is not None:
        new_gamma.copy_(gamma)
    return not torch.equal(new_gamma, old_gamma)


def _has_statistics(layer: nn.BatchNorm2d) -> bool:
    """Whether the running statistics were estimated from data (not still at their 0 / 1 defaults)."""
    if not layer.track_running_stats:
        return False
    return bool(torch.count_nonzero(layer.running_mean) or torch.count_nonzero(layer.running_var - 1))


def _swap(module: nn.Module, predicate: Callable[[nn.Module], bool],
          make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    if predicate(module):
        return make(module)
    for name, child in module.named_children():
        new_child = _swap(child, predicate, make)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_norm(model: nn.Module, norm_layer: str | LayerFactory, bn_transfer: str = "keep", *,
                 calibration_batches: Iterable[Any] | None = None, only_plain: bool = False,
                 **layer_kwargs: Any) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``model`` (timm's ``BatchNormAct2d`` included) for ``norm_layer``.

    Works on any module tree, including the timm families that do not take ``norm_layer=`` (mobilenetv3, vgg*_bn,
    dla, rexnet) and ``features_only`` models. Running statistics, β, the fused layer's activation and drop path,
    ``requires_grad``, device, dtype and train/eval mode carry over; γ follows ``bn_transfer``.

    Args:
        model: the model to patch (modified in place; the returned root is new only if ``model`` is itself a BN).
        norm_layer: a registered name (``'bn_gamma01'``) or a layer class / ``functools.partial``.
        bn_transfer: ``keep`` | ``reset`` | ``scale``: what the existing γ becomes (see the module docstring).
        calibration_batches: batches (tensors or ``(input, ...)`` tuples) to recalibrate running statistics with
            when the policy changed γ.
        only_plain: convert only layers that are not already timm-bninit variants.
        **layer_kwargs: extra keyword arguments for the new layers (``gamma_init=0.2``, ``gamma_lr_div=50``).

    Returns:
        The patched model.

    Example::

        model = convert_norm(timm.create_model("resnet50", pretrained=True), "bn_gamma01", bn_transfer="keep")
    """
    check_bn_transfer(bn_transfer)
    norm, norm_act = _resolve_factories(norm_layer, layer_kwargs)
    changed: list[str] = []

    def make(old: nn.BatchNorm2d) -> nn.Module:
        new = _build_like(old, norm, norm_act)
        if _copy_state(old, new, bn_transfer) and _has_statistics(old):
            changed.append(type(new).__name__)
        new.train(old.training)
        return new

    def predicate(module: nn.Module) -> bool:
        return _is_convertible(module) and not (only_plain and isinstance(module, BatchNormVariant))

    model = _swap(model, predicate, make)
    if changed:
        if calibration_batches is not None:
            recalibrate_bn_stats(model, calibration_batches)
        else:
            warnings.warn(STALE_STATISTICS.format(policy=bn_transfer, count=len(changed),
                                                  extra=" (or pass calibration_batches)"),
                          BNTransferWarning, stacklevel=2)
    return model


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("pixel_values", "image", "input", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise BNInitTypeError(f"calibration batches must be tensors, (input, ...) tuples or dicts with "
                          f"'pixel_values'/'image'; got {type(batch).__name__}")


@torch.no_grad()
def recalibrate_bn_stats(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Re-estimate every BN layer's running statistics on ``batches`` ("precise BN").

    The statistics become the plain average over the batches (not an exponential moving average). Only the BN
    layers run in train mode (dropout and the like stay in eval); parameters are untouched; the blended-σ layers'
    previous-batch σ and every layer's batch counter are restored afterwards, so training continues as before.

    Returns:
        The number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = {m: {name: buf.clone() for name, buf in m.named_buffers(recurse=False)} for m in norms}
    momenta = {m: m.momentum for m in norms}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    used, finished = 0, False
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            model(_first_tensor(batch).to(device))
            used += 1
        finished = used > 0
    finally:
        for m, buffers in saved.items():
            m.momentum = momenta[m]
            for name, value in buffers.items():
                # keep the new estimates; put back everything else (and everything, if estimation failed)
                if not finished or name not in ("running_mean", "running_var"):
                    getattr(m, name).copy_(value)
        for m, training in modes.items():
            m.training = training
    if used == 0:
        raise BNInitValueError("recalibrate_bn_stats got no batches; the running statistics were left unchanged. "
                               "Pass a non-empty iterable of training batches")
    return used
