"""Analyses of the seeds' science: effective initial scale, how far γ moved, small-γ fractions and γ clamping
(docs/methods.md §5).

The one place that defines the γ thresholds: training clamps at them and reports count below them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BNInitValueError, RecipeError
from ..gammas import bn_gammas

__all__ = ["GAMMA_THRESHOLDS", "effective_initial_scale", "gamma_change", "gamma_statistics", "small_gamma_fraction",
           "clamped_gammas", "freeze_all_but_norm"]

GAMMA_THRESHOLDS = (0.01, 0.05, 0.1)  # |γ| below these counts as small (Frankle et al. report < 0.01)


def _gammas(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    return [(module, gamma) for _, module, gamma in bn_gammas(model)]


@torch.no_grad()
def effective_initial_scale(model: nn.Module) -> float | None:
    """Mean over BN channels of γ × the calibration's initial factor (RBN 0.731, IEBN 0.269, else 1).

    The multiplier every normalised activation starts with: γ0 for the γ-init method, 1 for plain BN.
    """
    values = [weight.float().flatten() * float(getattr(module, "initial_scale", 1.0))
              for module, weight in _gammas(model)]
    return float(torch.cat(values).mean()) if values else None


def gamma_change(initial: Mapping[str, Sequence[float]],
                 final: Mapping[str, Sequence[float]]) -> dict[str, float] | None:
    """How far γ moved during a run, from γ by module name at its start and end (``initial_gammas.json``,
    ``final_gammas.json``): over every γ entry, pooled over layers (each channel counts once, so a wide layer counts
    more than a narrow one).

    Every BN layer that has a γ counts, the official protocol's input BN included (its three channels train in the γ
    group like every other); a layer without γ has no entry in either file and is skipped.

    Returns:
        ``mean`` and ``max`` of |γ_final − γ_init|, ``initial_mean`` (mean |γ_init|, the scale to read the change
        against), ``channels`` and ``layers``; None for a model without any γ.

    Raises:
        BNInitValueError: the two records do not name the same layers with the same numbers of channels.
    """
    # paired by module name: the JSON files store their keys sorted, the model lists them in its own order
    if set(initial) != set(final) or any(len(initial[k]) != len(final[k]) for k in initial):
        raise BNInitValueError(f"the initial and final γ records differ in layers or channels ({len(initial)} and "
                               f"{len(final)} layers); they must come from the same model")
    start = np.array([g for name in final for g in initial[name]], dtype=np.float64)
    end = np.array([g for name in final for g in final[name]], dtype=np.float64)
    if start.size == 0:
        return None
    moved = np.abs(end - start)
    return {"mean": float(moved.mean()), "max": float(moved.max()), "initial_mean": float(np.abs(start).mean()),
            "channels": int(start.size), "layers": len(initial)}


def small_gamma_fraction(gammas: dict[str, Sequence[float]], threshold: float) -> float:
    """Fraction of all BN channels with |γ| < ``threshold`` (Frankle et al. report 27-33% below 0.01)."""
    flat = torch.tensor([g for layer in gammas.values() for g in layer], dtype=torch.float64)
    return float((flat.abs() < threshold).double().mean()) if flat.numel() else float("nan")


@torch.no_grad()
def gamma_statistics(model: nn.Module) -> dict[str, float]:
    """Mean and std of every BN γ, and the fraction of |γ| below each of :data:`GAMMA_THRESHOLDS` (for trackers)."""
    values = [gamma.detach().float().flatten() for _, _, gamma in bn_gammas(model)]
    if not values:
        return {}
    flat = torch.cat(values)
    stats = {"gamma/mean": float(flat.mean()), "gamma/std": float(flat.std()) if flat.numel() > 1 else 0.0}
    stats.update({f"gamma/below_{t:g}": float((flat.abs() < t).float().mean()) for t in GAMMA_THRESHOLDS})
    return stats


@contextlib.contextmanager
def clamped_gammas(model: nn.Module, threshold: float) -> Iterator[float]:
    """Set every BN γ with |γ| < ``threshold`` to 0 for the block (yields the fraction clamped), then restore."""
    saved = [(weight, weight.detach().clone()) for _, weight in _gammas(model)]
    total = clamped = 0
    with torch.no_grad():
        for weight, _ in saved:
            small = weight.abs() < threshold
            clamped += int(small.sum())
            total += small.numel()
            weight.masked_fill_(small, 0.0)
    try:
        yield clamped / max(total, 1)
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def freeze_all_but_norm(model: nn.Module, train_classifier: bool = True) -> int:
    """BN-only training (Frankle et al.): freeze every parameter but BN γ/β (and the classifier if asked).

    Running statistics still update in train mode. Returns the number of trainable parameters left.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    if train_classifier:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Module):
            raise RecipeError(f"{type(model).__name__} has no get_classifier(); cannot keep the output layer "
                             f"trainable (set train_classifier=false)")
        for param in classifier.parameters():
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
