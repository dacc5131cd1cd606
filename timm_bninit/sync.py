"""SyncBatchNorm conversion that never silently turns a variant back into plain BN.

torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` and timm's ``convert_sync_batchnorm`` rebuild every BatchNorm
subclass as plain (Sync)BN, dropping a variant's γ learning-rate divisor and, for RBN/IEBN/blended-σ BN, its whole
computation. :func:`convert_sync_batchnorm` instead

* converts the variants that are plain BN at run time (``plain_bn_forward``: the γ-init and uniform-γ layers and
  subclasses of them that keep BN's forward) to :class:`SyncBatchNormGamma` / :class:`SyncBatchNormGammaAct`, which
  keep ``gamma_init`` and ``gamma_lr_div`` so :func:`timm_bninit.param_groups` still divides γ's rate;
* keeps calibrating layers (RBN, IEBN, blended-σ BN, any :class:`~timm_bninit.norm.CalibratedBatchNorm2d` subclass,
  and their Act twins) as they are and switches on their own synchronised batch statistics (``sync_batch_stats``):
  their per-channel μ and σ² are BN's and are all-gathered across processes, while their calibrations stay per
  sample. Class, state-dict keys and parameters are unchanged;
* refuses, with :class:`VariantSyncError`, any other :class:`~timm_bninit.norm.BatchNormVariant` subclass, whose
  statistics it does not know how to synchronise.

What a layer is decides (:func:`sync_kind`), never a list of classes, so a user's variant synchronises when it
derives from the right base.

``import timm_bninit`` routes torch's and timm's conversion functions through this one whenever the model contains a
timm-bninit variant (models without one convert exactly as before).
"""

from __future__ import annotations

import functools
from typing import Any

import timm.layers
import timm.layers.norm_act as _timm_norm_act
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BNInitError, BNInitValueError
from .norm import BatchNormVariant, _CalibratedBase

__all__ = ["SyncBatchNormGamma", "SyncBatchNormGammaAct", "VariantSyncError", "convert_sync_batchnorm", "sync_kind"]

_BATCHNORM_FORWARDS = (nn.BatchNorm2d.forward, BatchNormAct2d.forward)
_torch_convert = nn.SyncBatchNorm.convert_sync_batchnorm.__func__
_timm_convert = _timm_norm_act.convert_sync_batchnorm


class VariantSyncError(BNInitError, RuntimeError):
    """A model holds norm-layer variants that this package does not know how to synchronise across devices."""


class _GlooSync:
    """Synchronised training statistics for a BN layer in a gloo (CPU) job, where torch's SyncBatchNorm kernels
    refuse CPU tensors and DDP refuses SyncBatchNorm modules on CPU.

    The layer keeps its own class beneath this mixin (``isinstance``, γ-init attributes, state-dict keys unchanged).
    In training the per-channel mean and then the centred sum of squares are all-reduced with the differentiable
    ``torch.distributed.nn.functional.all_reduce`` (two passes, no Σx² cancellation), so autograd returns the full
    batch's gradients.
    """

    process_group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        y = _cpu_sync_batch_norm(self, x)
        return self.act(self.drop(y)) if isinstance(self, BatchNormAct2d) else y


@functools.cache
def _gloo_class(cls: type) -> type:
    return type(f"GlooSync{cls.__name__}", (_GlooSync, cls), {"__module__": __name__})


def _gloo_job(process_group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "gloo"


def _cpu_sync_batch_norm(layer: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    group = layer.process_group or dist.group.WORLD
    dims = [0, *range(2, x.dim())]
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
    dist.all_reduce(count, group=group)
    count = float(count)
    mean = dist_nn.all_reduce(x.sum(dims, dtype=stats_dtype), group=group) / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    centered = x.to(stats_dtype) - mean.view(shape)
    var = dist_nn.all_reduce(centered.square().sum(dims), group=group) / count
    if layer.track_running_stats:
        if count <= 1:
            raise BNInitValueError(f"{type(layer).__name__} needs more than 1 value per channel in training mode")
        layer.num_batches_tracked.add_(1)
        factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum
        with torch.no_grad():
            layer.running_mean.lerp_(mean.detach().to(layer.running_mean.dtype), factor)
            layer.running_var.lerp_((var.detach() * (count / (count - 1))).to(layer.running_var.dtype), factor)
    y = centered * torch.rsqrt(var + layer.eps).view(shape)
    if layer.affine:
        y = y * layer.weight.to(stats_dtype).view(shape) + layer.bias.to(stats_dtype).view(shape)
    return y.to(x.dtype)


class _GammaAttrs:
    gamma_init: float | None = None
    gamma_lr_div: float = 1.0

    def extra_repr(self) -> str:
        init = "U(0,1)" if self.gamma_init is None else f"{self.gamma_init:g}"
        return f"{super().extra_repr()}, gamma_init={init}, gamma_lr_div={self.gamma_lr_div:g}"


class SyncBatchNormGamma(_GammaAttrs, nn.SyncBatchNorm):
    """SyncBatchNorm carrying a γ-init variant's ``gamma_init`` and ``gamma_lr_div``."""


class SyncBatchNormGammaAct(_GammaAttrs, SyncBatchNormAct):
    """timm's SyncBatchNormAct carrying a γ-init variant's ``gamma_init`` and ``gamma_lr_div``."""


def sync_kind(layer: nn.Module) -> str | None:
    """How :func:`convert_sync_batchnorm` synchronises a timm-bninit layer, decided by what it is.

    Returns:
        ``"batchnorm"`` for a variant that is plain BN at run time (``plain_bn_forward`` and BN's own forward, not
        overridden), ``"calibrated"`` for a calibrating layer (its own ``sync_batch_stats``), None for any other
        variant (and for layers that are not timm-bninit variants).
    """
    if isinstance(layer, _CalibratedBase):
        return "calibrated"
    layer_type = type(layer)
    if issubclass(layer_type, _GlooSync):  # converted already (gloo job): judge the class beneath the mixin
        layer_type = layer_type.__bases__[1]
    if isinstance(layer, BatchNormVariant) and layer.plain_bn_forward and layer_type.forward in _BATCHNORM_FORWARDS:
        return "batchnorm"
    return None


def _unsyncable(module: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, BatchNormVariant) and sync_kind(m) is None]


def _contains_variant(module: nn.Module) -> bool:
    return any(isinstance(m, BatchNormVariant) for m in module.modules())


def _convert_gamma_layer(layer: nn.BatchNorm2d, process_group) -> nn.Module:
    fused = isinstance(layer, BatchNormAct2d)
    cls = SyncBatchNormGammaAct if fused else SyncBatchNormGamma
    new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
              process_group=process_group)
    new.gamma_init = getattr(layer, "gamma_init", None)
    new.gamma_lr_div = layer.gamma_lr_div
    if layer.affine:
        with torch.no_grad():
            new.weight, new.bias = layer.weight, layer.bias  # shared, as torch's conversion does
    new.running_mean, new.running_var = layer.running_mean, layer.running_var
    new.num_batches_tracked = layer.num_batches_tracked
    if fused:
        new.act, new.drop = layer.act, layer.drop
    new.train(layer.training)
    return new


def _convert(module: nn.Module, process_group) -> nn.Module:
    kind = sync_kind(module)
    plain_bn = isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, _GlooSync))
    if plain_bn and kind != "calibrated" and _gloo_job(process_group):
        module.__class__, module.process_group = _gloo_class(type(module)), process_group  # in place, as below
        return module
    if kind == "batchnorm":
        return _convert_gamma_layer(module, process_group)
    if kind == "calibrated":
        # the same module, switched to global batch statistics: nothing to copy, no key or parameter changes
        module.sync_batch_stats, module.process_group = True, process_group
        return module
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return _timm_convert(module, process_group)
    for name, child in module.named_children():
        new_child = _convert(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Convert BN layers to synchronised BN, keeping every variant's class and behaviour.

    Plain BN layers become ``nn.SyncBatchNorm`` / timm's ``SyncBatchNormAct`` (as timm converts them), γ-init variants
    :class:`SyncBatchNormGamma` / :class:`SyncBatchNormGammaAct`, and RBN / IEBN / blended-σ layers stay themselves
    with ``sync_batch_stats = True`` (in place). In a gloo (CPU) job, whose tensors torch's SyncBatchNorm refuses,
    plain BN and γ-init layers keep their class too, beneath a mixin that all-reduces their batch statistics.
    ``process_group`` defaults to torch.distributed's default group.

    Raises:
        VariantSyncError: the model holds a ``BatchNormVariant`` that is neither plain BN at run time nor a
            calibrating layer (:func:`sync_kind`).

    Example::

        model = timm_bninit.convert_sync_batchnorm(model)  # before wrapping in DDP / accelerator.prepare
    """
    unsyncable = _unsyncable(module)
    if unsyncable:
        shown = ", ".join(unsyncable[:4]) + (f" and {len(unsyncable) - 4} more" if len(unsyncable) > 4 else "")
        raise VariantSyncError(
            f"cannot synchronise {len(unsyncable)} norm layers whose batch statistics timm-bninit does not know: "
            f"{shown}. Drop sync_bn=true to train them with per-device batch statistics, or derive the variant from "
            f"BatchNormGamma2d (plain BN at run time) or CalibratedBatchNorm2d, which synchronise.")
    return _convert(module, process_group)


def _guarded_torch_convert(cls, module, process_group=None):
    if _contains_variant(module):
        return convert_sync_batchnorm(module, process_group)
    return _torch_convert(cls, module, process_group)


def _guarded_timm_convert(module, process_group=None):
    if _contains_variant(module):
        return convert_sync_batchnorm(module, process_group)
    return _timm_convert(module, process_group)


def install_sync_guards() -> None:
    """Route torch's and timm's SyncBatchNorm conversions through :func:`convert_sync_batchnorm` for variants."""
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(_guarded_torch_convert)
    _timm_norm_act.convert_sync_batchnorm = _guarded_timm_convert
    timm.layers.convert_sync_batchnorm = _guarded_timm_convert
