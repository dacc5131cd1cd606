"""Which tensors of a model are BN γ: the one definition every part of timm-bninit asks."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_gammas", "gammaless_norms"]


def bn_gammas(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """Yield ``(module name, module, γ)`` for every BN-type layer whose ``weight`` is a trainable-kind Parameter.

    A layer without γ (``affine=False``, or the blended-σ BN whose ``weight`` is a placeholder buffer) is skipped.

    Example::

        n_channels = sum(gamma.numel() for _, _, gamma in bn_gammas(model))
    """
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, _BatchNorm) and isinstance(weight, nn.Parameter):
            yield name, module, weight


def gammaless_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(module name, module)`` for every BN-type layer without a γ Parameter."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not isinstance(getattr(module, "weight", None), nn.Parameter):
            yield name, module
