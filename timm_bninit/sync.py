"""SyncBatchNorm conversion that never silently turns a variant back into plain BN.

torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` and timm's ``convert_sync_batchnorm`` rebuild every BatchNorm
subclass as plain (Sync)BN, dropping a variant's γ learning-rate divisor and, for RBN/IEBN/blended-σ BN, its whole
computation. :func:`convert_sync_batchnorm` instead

* converts the γ-init variants (plain BN at run time) to :class:`SyncBatchNormGamma` / :class:`SyncBatchNormGammaAct`,
  which keep ``gamma_init`` and ``gamma_lr_div`` so :func:`timm_bninit.param_groups` still divides γ's rate;
* refuses, with :class:`VariantSyncError`, the layers whose calibration is computed per device (RBN, IEBN,
  blended-σ BN), naming them and saying what to do.

``import timm_bninit`` routes torch's and timm's conversion functions through this one whenever the model contains a
timm-bninit variant (models without one convert exactly as before).
"""

from __future__ import annotations

import timm.layers
import timm.layers.norm_act as _timm_norm_act
import torch
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .norm import (
    BatchNormGamma2d,
    BatchNormGammaAct2d,
    BatchNormUniformGamma2d,
    BatchNormUniformGammaAct2d,
    BatchNormVariant,
)

__all__ = ["SyncBatchNormGamma", "SyncBatchNormGammaAct", "VariantSyncError", "convert_sync_batchnorm"]

_GAMMA_INIT_TYPES = (BatchNormGamma2d, BatchNormGammaAct2d, BatchNormUniformGamma2d, BatchNormUniformGammaAct2d)
_torch_convert = nn.SyncBatchNorm.convert_sync_batchnorm.__func__
_timm_convert = _timm_norm_act.convert_sync_batchnorm


class VariantSyncError(RuntimeError):
    """A model holds variants whose statistics cannot be synchronised across devices."""


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


def _unsyncable(module: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, BatchNormVariant) and not isinstance(m, _GAMMA_INIT_TYPES)]


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
    if isinstance(module, _GAMMA_INIT_TYPES):
        return _convert_gamma_layer(module, process_group)
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return _timm_convert(module, process_group)
    for name, child in module.named_children():
        new_child = _convert(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Convert BN layers to synchronised BN, keeping γ-init variants' settings; refuse per-device variants.

    Raises:
        VariantSyncError: the model holds RBN, IEBN or blended-σ BN layers.

    Example::

        model = timm_bninit.convert_sync_batchnorm(model)  # before wrapping in DDP / accelerator.prepare
    """
    unsyncable = _unsyncable(module)
    if unsyncable:
        shown = ", ".join(unsyncable[:4]) + (f" and {len(unsyncable) - 4} more" if len(unsyncable) > 4 else "")
        raise VariantSyncError(
            f"cannot synchronise {len(unsyncable)} norm layers whose calibration is computed per device: {shown}. "
            f"Train them with per-device batch statistics (as the RBN/IEBN reference code does): do not convert to "
            f"SyncBatchNorm (drop --sync-bn / sync_bn=true), or use a γ-init variant, which synchronises.")
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
