"""Plots of a sweep (matplotlib, PNG), one function a plot: accuracy per epoch, final γ by depth, small-γ fractions
and clamping, and each method's effective initial scale. They read run folders through :mod:`.layout` only."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt

from . import layout
from .analysis import GAMMA_THRESHOLDS, small_gamma_fraction

__all__ = ["plot_sweep", "plot_accuracy_per_epoch", "plot_gamma_by_depth", "plot_small_gamma", "plot_initial_scale"]

Groups = dict[tuple[str, str, float], list[dict[str, Any]]]


def _grouped(runs: list[dict[str, Any]]) -> Groups:
    groups: Groups = defaultdict(list)
    for run in runs:
        if run["final"] is not None:
            groups[(run.get("dataset", "?"), run["method"], run["lr"])].append(run)
    return groups


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_per_epoch(groups: Groups, dataset: str, methods: list[str], lrs: list[float], colours: dict,
                            path: Path) -> Path:
    """Test accuracy per epoch, mean ± std band per method, one panel per learning rate."""
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for method in methods:
            group = groups.get((dataset, method, lr))
            if not group:
                continue
            curves = [[m["test_acc"] for m in layout.read_metrics(run["path"])] for run in group]
            length = min(len(c) for c in curves)
            values = np.array([c[:length] for c in curves])
            epochs = np.arange(1, length + 1)
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(length)
            ax.plot(epochs, mean, label=f"{method} (n={len(values)})", color=colours[method])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=colours[method])
        ax.set(title=f"{dataset}, lr {lr:g}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gamma_by_depth(groups: Groups, dataset: str, methods: list[str], lr: float, colours: dict,
                        path: Path) -> Path:
    """Final γ by depth: median and 10-90% band of γ per BN layer, over channels and seeds."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for method in methods:
        per_layer: dict[int, list[float]] = defaultdict(list)
        for run in groups[(dataset, method, lr)]:
            for depth, values in enumerate(layout.read_gammas(run["path"]).values()):
                per_layer[depth].extend(values)
        if not per_layer:
            continue
        depths = sorted(per_layer)
        quantiles = np.array([np.quantile(per_layer[d], [0.1, 0.5, 0.9]) for d in depths])
        ax.plot(depths, quantiles[:, 1], label=method, color=colours[method])
        ax.fill_between(depths, quantiles[:, 0], quantiles[:, 2], alpha=0.15, color=colours[method])
    ax.set(title=f"{dataset}: final γ by depth (median, 10-90%), lr {lr:g}", xlabel="BN layer (input → output)",
           ylabel="γ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_small_gamma(groups: Groups, dataset: str, methods: list[str], lr: float, colours: dict, path: Path) -> Path:
    """The fraction of |γ| below each threshold, and test accuracy after clamping those γ to 0."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        group = groups[(dataset, method, lr)]
        merged = {f"{k}:{j}": v for j, run in enumerate(group) for k, v in layout.read_gammas(run["path"]).items()}
        fractions = [100.0 * small_gamma_fraction(merged, threshold) for threshold in GAMMA_THRESHOLDS]
        left.bar(np.arange(len(GAMMA_THRESHOLDS)) + i * width, fractions, width, label=method, color=colours[method])
        clamp = [run["final"].get("gamma_clamp") or [] for run in group]
        if all(clamp):
            labels = ["none"] + [f"|γ|<{c['threshold']:g}" for c in clamp[0]]
            accs = [[run["final"]["test_acc_last"]] + [c["test_acc"] for c in run_clamp]
                    for run, run_clamp in zip(group, clamp)]
            right.bar(np.arange(len(labels)) + i * width, np.mean(accs, 0), width,
                      yerr=np.std(accs, 0, ddof=1) if len(accs) > 1 else None, label=method, color=colours[method])
            right.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    left.set_xticks(np.arange(len(GAMMA_THRESHOLDS)) + 0.4 - width / 2, [f"|γ|<{t:g}" for t in GAMMA_THRESHOLDS])
    left.set(title=f"{dataset}: BN channels with small final γ", ylabel="% of channels")
    right.set(title="test accuracy of the last epoch after clamping small γ to 0", ylabel="test accuracy (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_initial_scale(groups: Groups, dataset: str, methods: list[str], lr: float, colours: dict,
                       path: Path) -> Path:
    """Each method's effective initial scale (γ × the calibration's initial factor, averaged over channels)."""
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods)), 3.5))
    scales = [np.mean([run["final"].get("initial_effective_scale") or np.nan for run in groups[(dataset, m, lr)]])
              for m in methods]
    ax.bar(range(len(methods)), scales, color=[colours[m] for m in methods])
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set(title=f"{dataset}: effective initial scale", ylabel="mean γ × initial calibration")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    return _save(fig, path)


def plot_sweep(runs: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Every plot of a sweep, per data set, into ``folder``; returns the files written."""
    groups = _grouped(runs)
    written = []
    for dataset in sorted({key[0] for key in groups}):
        keys = [k for k in groups if k[0] == dataset]
        methods = list(dict.fromkeys(k[1] for k in keys))
        lrs = sorted({k[2] for k in keys}, reverse=True)
        colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        written.append(plot_accuracy_per_epoch(groups, dataset, methods, lrs, colours,
                                               folder / f"{dataset}_accuracy_per_epoch.png"))
        lr = lrs[0]  # γ analyses at the largest learning rate (the paper's main setting)
        present = [m for m in methods if (dataset, m, lr) in groups]
        for plot, name in ((plot_gamma_by_depth, "gamma_by_depth"), (plot_small_gamma, "small_gamma"),
                           (plot_initial_scale, "initial_scale")):
            written.append(plot(groups, dataset, present, lr, colours, folder / f"{dataset}_{name}.png"))
    return written
