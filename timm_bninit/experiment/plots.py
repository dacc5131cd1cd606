"""Plots of a sweep (matplotlib, PNG), one function a plot: the paired differences to the baseline (an estimation
plot), accuracy per epoch, the learning curves (validation accuracy and loss, test accuracy), final γ by depth,
small-γ fractions and what clamping them costs, and each method's effective initial scale. They read run folders
through :mod:`.layout` only; the estimation plot reads the report's own tables and the learning curves the report's
own :func:`.convergence.learning_curves`, so the picture and the table can never disagree. Every plot names a method
by its label when the report has one (``labels``).

Each ``plot_*`` function returns an unsaved figure (tests inspect its artists); :func:`plot_sweep` saves and closes
them. Every figure uses constrained layout with its legend outside the axes, so no legend covers data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from . import layout
from .analysis import GAMMA_THRESHOLDS, small_gamma_fraction
from .convergence import CURVE_KEYS, Curve, learning_curves
from .tables import SweepTable, format_p

__all__ = ["plot_sweep", "plot_paired_differences", "plot_accuracy_per_epoch", "plot_learning_curves",
           "plot_gamma_by_depth", "plot_small_gamma", "plot_initial_scale", "JITTER"]

Groups = dict[tuple[str, str, float], list[dict[str, Any]]]
Colours = dict[str, Any]
Labels = dict[str, str] | None   # method -> the label a plot shows; None or a missing method: the method string

# The estimation plot's seed points sit in a band just above their row's mean and CI, so none hides behind the bar
POINTS_ABOVE = 0.25     # distance of the band's centre above the row
JITTER = 0.1            # half-height of the band
DPI = 110


def _grouped(runs: list[dict[str, Any]]) -> Groups:
    """The runs that trained to their end, by data set, method and lr: a diverged run has no curve to its last epoch
    and no γ to analyse (it is in the tables, and so in the estimation plot, at chance level)."""
    groups: Groups = defaultdict(list)
    for run in runs:
        if run["final"] is not None and not layout.is_diverged(run["final"]):
            groups[(run.get("dataset", "?"), run["method"], run["lr"])].append(run)
    return groups


def _name(labels: Labels, method: str) -> str:
    return (labels or {}).get(method, method)


def _figure(width: float, height: float, **subplots: Any) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(figsize=(width, height), layout="constrained", squeeze=False, **subplots)
    return fig, axes


def _legend_below(fig: Figure, handles: list[Any], labels: list[str]) -> None:
    """One legend for the whole figure, below the axes (constrained layout makes room, so it covers nothing)."""
    if handles:
        # long method names take fewer columns, so the legend stays as wide as the figure
        width = max(len(label) for label in labels)
        columns = max(1, min(len(labels), 4, int(fig.get_figwidth() * 14 // max(width + 4, 1))))
        fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=8, frameon=False)


def _band_alpha(methods: list[str]) -> float:
    """Fainter spread bands when many overlap, so the lines of the means stay readable."""
    return 0.2 if len(methods) <= 4 else 0.07


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # nothing outside the canvas is cut off
    plt.close(fig)
    return path


def _metric_text(metric: str) -> str:
    return "test accuracy at the best-validation epoch" if metric == "best_val" else "test accuracy at the last epoch"


def _row_text(cell: Any, holm: bool, alternative: str = "greater") -> str:
    """What the estimation plot writes beside a row: the mean difference, its CI and the table's p-value."""
    if cell is None:
        return "not run"
    if cell.power is None:
        return f"n = {cell.n}: no CI or test"
    summary = cell.power
    p = cell.p_holm if holm else cell.p
    interval = f"{summary.mean_diff:+.2f} [{summary.ci_low:+.2f}, {summary.ci_high:+.2f}]".replace("-", "−")
    qualifiers = (["two-sided"] if alternative == "two-sided" else []) + (["Holm"] if holm else [])
    name = f"p ({', '.join(qualifiers)})" if qualifiers else "p"
    return f"{interval}\n{name} = {format_p(p)}, n = {cell.n}"


def plot_paired_differences(table: SweepTable, colours: Colours) -> Figure:
    """The estimation plot of one report table: a row per method, a panel per learning rate.

    Each row shows the method's per-seed differences to the baseline (points just above the row, jittered vertically
    by at most :data:`JITTER`), their mean with the two-sided 95% paired-t interval (the report's power section), a
    zero line, and beside the row the mean, the interval and the one-sided paired p-value of the table
    (Holm-corrected when the table is). Artists carry ``gid`` ``seeds/<method>``, ``mean_ci/<method>`` and
    ``text/<method>``.
    """
    methods = [m for m in table.methods if m != table.baseline]
    label_inches = 0.075 * max((len(table.label(m)) for m in methods), default=0)  # the row labels' width, so long
    fig, axes = _figure(4.2 * len(table.lrs) + 2.0 + label_inches, 1.4 + 0.75 * max(len(methods), 1),  # names
                        ncols=len(table.lrs), sharey=True)                                       # names leave room
    rng = np.random.default_rng(0)  # the same jitter every time the report is written
    beside = []
    for ax, lr in zip(axes[0], table.lrs):
        base = table.cells.get((table.baseline, lr))
        extent = [0.0]
        side = blended_transform_factory(ax.transAxes, ax.transData)
        for row, method in enumerate(methods):
            cell = table.cells.get((method, lr))
            if cell is not None and base is not None:
                diffs = np.subtract(cell.values, base.values)
                ax.scatter(diffs, row - POINTS_ABOVE + rng.uniform(-JITTER, JITTER, len(diffs)), s=22, alpha=0.8,
                           color=colours[method], edgecolors="none", gid=f"seeds/{method}", zorder=2)
                extent += list(diffs)
            if cell is not None and cell.power is not None:
                summary = cell.power
                bars = ax.errorbar(summary.mean_diff, row, xerr=[[summary.mean_diff - summary.ci_low],
                                                                 [summary.ci_high - summary.mean_diff]],
                                   fmt="D", color="black", markersize=5, capsize=4, lw=1.4, zorder=3)
                for artist in bars.get_children():
                    artist.set_gid(f"mean_ci/{method}")
                extent += [summary.ci_low, summary.ci_high]
            beside.append(ax.text(1.03, row, _row_text(cell, table.holm, table.alternative), transform=side,
                                  va="center", ha="left", fontsize=8, gid=f"text/{method}"))
        ax.axvline(0.0, color="grey", lw=0.9, ls="--", zorder=1)
        low, high = min(extent), max(extent)
        margin = 0.08 * (high - low) if high > low else 0.5
        ax.set_xlim(low - margin, high + margin)
        ax.set(title=f"lr {lr:g}", xlabel=f"method − {table.label(table.baseline)} (percentage points)")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(methods)), [table.label(m) for m in methods])
    axes[0][0].set_ylim(len(methods) - 0.5, -0.5)  # first method on top, as in the table
    fig.suptitle(f"{table.dataset}: {_metric_text(table.metric)}, paired by seed with "
                 f"{table.label(table.baseline)}", fontsize=10)
    _legend_below(fig, [Line2D([], [], ls="", marker="o", color="grey", alpha=0.75),
                        Line2D([], [], ls="-", marker="D", color="black", markersize=5)],
                  [f"one seed: method − {table.label(table.baseline)}", "mean difference, 95% CI (paired t)"])
    return fig


def plot_accuracy_per_epoch(groups: Groups, dataset: str, methods: list[str], lrs: list[float],
                            colours: Colours, labels: Labels = None) -> Figure:
    """Test accuracy per epoch, mean ± sample std band over seeds per method, one panel per learning rate."""
    fig, axes = _figure(5.0 * len(lrs) + 0.5, 4.2, ncols=len(lrs))
    legend: dict[str, Any] = {}
    for ax, lr in zip(axes[0], lrs):
        for method in methods:
            group = groups.get((dataset, method, lr))
            if not group:
                continue
            curves = [[m["test_acc"] for m in layout.read_metrics(run["path"])] for run in group]
            length = min(len(c) for c in curves)
            values = np.array([c[:length] for c in curves])
            epochs = np.arange(1, length + 1)
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(length)
            (line,) = ax.plot(epochs, mean, marker="o", markersize=3, color=colours[method])
            ax.fill_between(epochs, mean - std, mean + std, alpha=_band_alpha(methods), color=colours[method], lw=0)
            legend.setdefault(f"{_name(labels, method)} (n={len(values)})", line)
        ax.set(title=f"{dataset}, lr {lr:g}: mean ± sample std over seeds", xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, list(legend.values()), list(legend))
    return fig


CURVE_TITLES = {"val_acc": "validation accuracy (%)", "val_loss": "validation loss (cross-entropy)",
                "test_acc": "test accuracy (%)"}


def plot_learning_curves(curves: dict[tuple[str, float], Curve], dataset: str, methods: list[str], lrs: list[float],
                         colours: Colours, labels: Labels = None) -> Figure:
    """Validation accuracy, validation loss and test accuracy per epoch: mean ± sample sd band over seeds per method,
    a column per quantity (those some run recorded), a row per learning rate. Methods of different lengths (a budget
    pilot's ``epochs`` values) share the epoch axis. Lines carry ``gid`` ``curve/<key>/<method>``."""
    keys = [k for k in CURVE_KEYS if any(np.isfinite(c.mean[k]).any() for c in curves.values())]
    fig, axes = _figure(4.3 * max(len(keys), 1) + 0.3, 3.3 * len(lrs) + 0.5, ncols=max(len(keys), 1), nrows=len(lrs),
                        sharex=True)
    legend: dict[str, Any] = {}
    for row, lr in enumerate(lrs):
        for ax, key in zip(axes[row], keys):
            for method in methods:
                curve = curves.get((method, lr))
                if curve is None or not np.isfinite(curve.mean[key]).any():
                    continue
                mean, sd = curve.mean[key], np.nan_to_num(curve.sd[key])  # one seed: no band
                (line,) = ax.plot(curve.epochs, mean, marker="o", markersize=3, color=colours[method],
                                  gid=f"curve/{key}/{method}")
                ax.fill_between(curve.epochs, mean - sd, mean + sd, alpha=_band_alpha(methods), color=colours[method],
                                lw=0)
                legend.setdefault(f"{_name(labels, method)} (n={curve.n})", line)
            ax.set_title(f"lr {lr:g}: {CURVE_TITLES[key]}", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if row == len(lrs) - 1:
                ax.set_xlabel("epoch")
    fig.suptitle(f"{dataset}: learning curves, mean ± sample sd over seeds", fontsize=10)
    _legend_below(fig, list(legend.values()), list(legend))
    return fig


def plot_gamma_by_depth(groups: Groups, dataset: str, methods: list[str], lr: float, colours: Colours,
                        labels: Labels = None) -> Figure:
    """Final γ by depth: median and 10-90% band of γ per BN layer, over channels and seeds."""
    fig, axes = _figure(8, 4.2)
    ax = axes[0][0]
    handles, names, bands = [], [], []
    for method in methods:
        per_layer: dict[int, list[float]] = defaultdict(list)
        for run in groups[(dataset, method, lr)]:
            for depth, values in enumerate(layout.read_gammas(run["path"]).values()):
                per_layer[depth].extend(values)
        if not per_layer:
            continue
        depths = sorted(per_layer)
        quantiles = np.array([np.quantile(per_layer[d], [0.1, 0.5, 0.9]) for d in depths])
        (line,) = ax.plot(depths, quantiles[:, 1], color=colours[method])
        ax.fill_between(depths, quantiles[:, 0], quantiles[:, 2], alpha=_band_alpha(methods), color=colours[method],
                        lw=0)
        handles.append(line)
        names.append(_name(labels, method))
        bands.append(quantiles)
    logarithmic = bool(bands) and min(b.min() for b in bands) > 0 and \
        max(b[:, 1].max() for b in bands) > 4 * min(b[:, 1].min() for b in bands)
    if logarithmic:  # γ0 = 0.1 beside γ0 = 1: on a linear axis the small method's band is a flat line
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1, 0.2, not 10⁻¹
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(title=f"{dataset}: final γ by depth (median, 10-90% over channels and seeds), lr {lr:g}",
           xlabel="BN layer (input → output)", ylabel="γ (log scale)" if logarithmic else "γ")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, names)
    return fig


def _clamp_drops(group: list[dict[str, Any]]) -> tuple[list[float], np.ndarray] | None:
    """Per seed (rows) and threshold (columns): last-epoch test accuracy minus the accuracy with small γ clamped."""
    clamps = [run["final"].get("gamma_clamp") or [] for run in group]
    if not all(clamps):
        return None
    thresholds = [c["threshold"] for c in clamps[0]]
    drops = np.array([[run["final"]["test_acc_last"] - c["test_acc"] for c in clamp]
                      for run, clamp in zip(group, clamps)])
    return thresholds, drops


def plot_small_gamma(groups: Groups, dataset: str, methods: list[str], lr: float, colours: Colours,
                     labels: Labels = None) -> Figure:
    """Left: the % of BN channels with |γ| below each threshold. Right: the test accuracy lost (last epoch, mean ±
    sample std over seeds) when those γ are set to 0: a drop, so that differences of a tenth of a point show.

    Bars carry ``gid`` ``fraction/<method>`` and ``drop/<method>``.
    """
    fig, axes = _figure(11, 4.4, ncols=2)
    left, right = axes[0]
    width = 0.8 / max(len(methods), 1)
    handles, clamp_thresholds = [], None
    for i, method in enumerate(methods):
        group = groups[(dataset, method, lr)]
        merged = {f"{k}:{j}": v for j, run in enumerate(group) for k, v in layout.read_gammas(run["path"]).items()}
        fractions = [100.0 * small_gamma_fraction(merged, threshold) for threshold in GAMMA_THRESHOLDS]
        offset = (i - (len(methods) - 1) / 2) * width
        bars = left.bar(np.arange(len(GAMMA_THRESHOLDS)) + offset, fractions, width, color=colours[method],
                        gid=f"fraction/{method}")
        # a 0% bar is otherwise invisible; two significant digits, so that a bar of 0.007% is not labelled "0"
        left.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        handles.append(bars)
        clamped = _clamp_drops(group)
        if clamped is None:
            continue
        clamp_thresholds, drops = clamped
        errors = drops.std(0, ddof=1) if len(drops) > 1 else None
        means = drops.mean(0)
        right.bar(np.arange(len(clamp_thresholds)) + offset, means, width, yerr=errors, capsize=2,
                  color=colours[method], gid=f"drop/{method}", error_kw={"lw": 0.8})
        if len(methods) > 4:
            continue  # too narrow for numbers: they would overlap each other
        for x, mean, error in zip(np.arange(len(clamp_thresholds)) + offset, means,
                                  np.zeros_like(means) if errors is None else errors):
            # the value past the error bar's end, where neither the bar nor its cap hides it
            right.annotate(f"{mean:.1f}", (x, mean + error if mean >= 0 else mean - error), xytext=(0, 2 if mean >= 0
                           else -2), textcoords="offset points", ha="center", va="bottom" if mean >= 0 else "top",
                           fontsize=7)
    left.set_xticks(range(len(GAMMA_THRESHOLDS)), [f"|γ| < {t:g}" for t in GAMMA_THRESHOLDS])
    left.set(title=f"{dataset}: BN channels with small final γ, lr {lr:g}", ylabel="% of channels")
    left.margins(y=0.12)
    if clamp_thresholds is not None:
        right.set_xticks(range(len(clamp_thresholds)), [f"|γ| < {t:g} set to 0" for t in clamp_thresholds])
    right.axhline(0.0, color="grey", lw=0.8)
    right.margins(y=0.12)
    # nothing small or nothing lost: a fixed range rather than matplotlib's ±0.06 or a 1e-17 scale of rounding noise
    left.set_ylim(0.0, max(left.get_ylim()[1], 1e-3))
    low, high = right.get_ylim()
    right.set_ylim(min(low, -0.1), max(high, 0.1))
    right.set(title="test accuracy lost by clamping small γ (last epoch)",
              ylabel="accuracy drop (percentage points)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    _legend_below(fig, handles, [_name(labels, m) for m in methods])
    return fig


def plot_initial_scale(groups: Groups, dataset: str, methods: list[str], lr: float, colours: Colours,
                       labels: Labels = None) -> Figure:
    """Each method's effective initial scale (γ × the calibration's initial factor, averaged over channels and
    seeds), as horizontal bars so that long method names read level."""
    fig, axes = _figure(6.5, 1.3 + 0.38 * len(methods))
    ax = axes[0][0]
    scales = [np.mean([run["final"].get("initial_effective_scale") or np.nan for run in groups[(dataset, m, lr)]])
              for m in methods]
    bars = ax.barh(range(len(methods)), scales, color=[colours[m] for m in methods])
    ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=4)
    ax.set_yticks(range(len(methods)), [_name(labels, m) for m in methods])
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--", zorder=0)
    ax.margins(x=0.12)
    ax.set(title=f"{dataset}: effective initial scale", xlabel="mean γ × initial calibration factor (1 = plain BN)")
    return fig


def plot_sweep(runs: list[dict[str, Any]], folder: Path, tables: list[SweepTable], curves: bool = False) -> list[Path]:
    """Every plot of a sweep, per data set, into ``folder``; returns the files written.

    Args:
        runs: the sweep's runs (:func:`.layout.sweep_runs`).
        folder: where the PNGs go.
        tables: the report's tables (:func:`.report.summarise`), the numbers of the estimation plot and the labels of
            every plot.
        curves: also draw the learning curves (``<dataset>_learning_curves.png``), as the report's section does.
    """
    groups = _grouped(runs)
    written = []
    for dataset in sorted({key[0] for key in groups}):
        keys = [k for k in groups if k[0] == dataset]
        # the tables' methods too: one whose every run diverged has no group, but a colour in the estimation plot
        methods = list(dict.fromkeys([m for t in tables if t.dataset == dataset for m in t.methods] +
                                     [k[1] for k in keys]))
        lrs = sorted({k[2] for k in keys}, reverse=True)
        colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        labels = next((dict(t.labels) for t in tables if t.dataset == dataset), {})
        for table in tables:
            if table.dataset == dataset and len(table.methods) > 1:
                written.append(_save(plot_paired_differences(table, colours),
                                     folder / f"{dataset}_paired_differences.png"))
        written.append(_save(plot_accuracy_per_epoch(groups, dataset, methods, lrs, colours, labels),
                             folder / f"{dataset}_accuracy_per_epoch.png"))
        if curves:
            written.append(_save(plot_learning_curves(learning_curves(runs, dataset), dataset, methods, lrs, colours,
                                                      labels), folder / f"{dataset}_learning_curves.png"))
        lr = lrs[0]  # γ analyses at the largest learning rate (the paper's main setting)
        present = [m for m in methods if (dataset, m, lr) in groups]
        for plot, name in ((plot_gamma_by_depth, "gamma_by_depth"), (plot_small_gamma, "small_gamma"),
                           (plot_initial_scale, "initial_scale")):
            written.append(_save(plot(groups, dataset, present, lr, colours, labels),
                                 folder / f"{dataset}_{name}.png"))
    return written
