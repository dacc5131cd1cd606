"""What the runs of a sweep did while training: their learning curves, whether they had converged, and how far γ moved.

A comparison of final accuracies says nothing of whether the baseline had finished learning, or whether a γ that a
method initialises and trains slowly ever left its starting value; these sections say it, from the run files
(:mod:`.layout`: ``metrics.jsonl`` per epoch, ``final.json``'s ``gamma_change``). :mod:`.report` writes them under each
table, :mod:`.plots` draws the curves from :func:`learning_curves`, so the picture and the table agree.

- **Learning curves**: per method and learning rate, the mean ± sample sd over seeds, per epoch, of the validation
  accuracy and loss and the test accuracy.
- **Convergence**: per method and learning rate, the last epoch's validation accuracy and loss, their change over the
  last quarter of the epochs, and in how many runs the best-validation epoch was the last one (still improving).
  Rows are per method, so a sweep whose methods differ only in ``epochs`` (``base+epochs=8,base+epochs=16``, a budget
  pilot) reads as one row per budget.
- **Did γ move?**: per method and learning rate, the mean over seeds of each run's mean |γ_final − γ_init|.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .tables import SweepTable

__all__ = ["CURVE_KEYS", "CURVES_CSV", "Curve", "ConvergenceRow", "has_losses", "learning_curves", "convergence_rows",
           "training_markdown", "gamma_change_markdown", "convergence_markdown", "write_curves_csv"]

CURVE_KEYS = ("val_acc", "val_loss", "test_acc")   # the per-epoch quantities of the curves, as metrics.jsonl names them
CURVE_NAMES = {"val_acc": "val acc", "val_loss": "val loss", "test_acc": "test acc"}
CURVES_CSV = "learning_curves.csv"


@dataclass(frozen=True)
class Curve:
    """One method and learning rate: per-epoch mean and sample sd over its seeds (NaN where a value was not recorded).

    Attributes:
        method: the method string.
        lr: the learning rate.
        n: the runs averaged.
        epochs: 1 … E, E the shortest run's epoch count (every run of a cell normally has the same).
        mean: per :data:`CURVE_KEYS`, the mean over runs at each epoch.
        sd: per :data:`CURVE_KEYS`, the sample sd over runs at each epoch (NaN with one run).
    """

    method: str
    lr: float
    n: int
    epochs: np.ndarray
    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]


@dataclass(frozen=True)
class ConvergenceRow:
    """Where one method and learning rate ended: per-run values, summarised over seeds in the report.

    Attributes:
        method: the method string.
        lr: the learning rate.
        epochs: each run's number of epochs.
        last: per ``val_acc`` and ``val_loss``, each run's value at its last epoch (NaN when not recorded).
        change: per ``val_acc`` and ``val_loss``, each run's value at its last epoch E minus that at E − ⌊E/4⌋ (at
            least one epoch back); empty for one-epoch runs.
        best_is_last: how many runs had their best-validation epoch (the first with the highest validation accuracy,
            the one training selects; test accuracy where there is no validation split) at their last epoch.
    """

    method: str
    lr: float
    epochs: list[int]
    last: dict[str, list[float]]
    change: dict[str, list[float]]
    best_is_last: int

    @property
    def n(self) -> int:
        return len(self.epochs)


def _value(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float("nan") if value is None else float(value)


def has_losses(runs: list[dict[str, Any]]) -> bool:
    """Whether any finished run recorded a validation or test loss per epoch (runs from before losses were recorded
    have none, and their reports stay as they were)."""
    return any(record.get("val_loss") is not None or record.get("test_loss") is not None
               for run in runs if run["final"] is not None for record in layout.read_metrics(run["path"]))


def _cells(runs: list[dict[str, Any]], dataset: str) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """The finished runs of ``dataset`` by (method, lr), in the sweep's method order, each cell ordered by seed."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        if run["final"] is not None and run.get("dataset", "?") == dataset:
            cells.setdefault((run["method"], run["lr"]), []).append(run)
    return {key: sorted(group, key=lambda r: r["seed"]) for key, group in cells.items()}


def learning_curves(runs: list[dict[str, Any]], dataset: str) -> dict[tuple[str, float], Curve]:
    """Per (method, lr) of ``dataset``: the mean ± sd over seeds of :data:`CURVE_KEYS` per epoch."""
    curves = {}
    for (method, lr), group in _cells(runs, dataset).items():
        metrics = [layout.read_metrics(run["path"]) for run in group]
        length = min(len(m) for m in metrics)
        if length == 0:
            continue
        mean, sd = {}, {}
        for key in CURVE_KEYS:
            values = np.array([[_value(record, key) for record in m[:length]] for m in metrics])
            mean[key] = values.mean(0)
            sd[key] = values.std(0, ddof=1) if len(values) > 1 else np.full(length, np.nan)
        curves[(method, lr)] = Curve(method, lr, len(metrics), np.arange(1, length + 1), mean, sd)
    return curves


def _convergence_row(method: str, lr: float, group: list[dict[str, Any]]) -> ConvergenceRow | None:
    epochs, last, change, best_is_last = [], {"val_acc": [], "val_loss": []}, {"val_acc": [], "val_loss": []}, 0
    for run in group:
        metrics = layout.read_metrics(run["path"])
        if not metrics:
            continue
        count = len(metrics)
        epochs.append(count)
        back = max(1, count // 4)
        for key in last:
            last[key].append(_value(metrics[-1], key))
            if count > back:
                change[key].append(_value(metrics[-1], key) - _value(metrics[-1 - back], key))
        # training keeps the first epoch with the highest validation accuracy (test without a validation split)
        selected = [_value(m, "val_acc") if m.get("val_acc") is not None else _value(m, "test_acc") for m in metrics]
        best_is_last += int(np.argmax(selected)) == count - 1
    return ConvergenceRow(method, lr, epochs, last, change, best_is_last) if epochs else None


def convergence_rows(runs: list[dict[str, Any]], table: SweepTable) -> list[ConvergenceRow]:
    """One row per method and learning rate of ``table``, in the table's order (learning rates first)."""
    cells = _cells(runs, table.dataset)
    rows = [_convergence_row(method, lr, cells[(method, lr)])
            for lr in table.lrs for method in table.methods if (method, lr) in cells]
    return [row for row in rows if row is not None]


def _mean_sd(values: list[float], digits: int, signed: bool = False) -> str:
    array = np.asarray(values, dtype=float)
    if array.size == 0 or np.isnan(array).all():
        return "n/a"
    mean = float(array.mean())
    sd = "n/a" if array.size < 2 else f"{float(array.std(ddof=1)):.{digits}f}"
    text = f"{mean:+.{digits}f}".replace("-", "−") if signed else f"{mean:.{digits}f}"
    return f"{text} ± {sd}"


def _span(epochs: list[int]) -> str:
    """The epochs the change is taken over, ``(12→16)``; a range when the runs differ in length."""
    starts = sorted({e - max(1, e // 4) for e in epochs})
    ends = sorted(set(epochs))
    start = str(starts[0]) if len(starts) == 1 else f"{starts[0]}–{starts[-1]}"
    end = str(ends[0]) if len(ends) == 1 else f"{ends[0]}–{ends[-1]}"
    return f"({start}→{end})"


def convergence_markdown(rows: list[ConvergenceRow], table: SweepTable) -> str:
    """The convergence table: where each method ended, and whether it was still improving there."""
    lines = ["| method | lr | runs | epochs | val acc, last epoch | Δ val acc, last quarter | val loss, last epoch | "
             "Δ val loss, last quarter | best-validation epoch = last |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        epochs = sorted(set(row.epochs))
        epochs_text = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}"
        span = _span(row.epochs) if row.change["val_acc"] else ""
        acc_change = _mean_sd(row.change["val_acc"], 2, signed=True)
        loss_change = _mean_sd(row.change["val_loss"], 3, signed=True)
        lines.append(f"| {table.label(row.method)} | {row.lr:g} | {row.n} | {epochs_text} | "
                     f"{_mean_sd(row.last['val_acc'], 2)} | {acc_change}{' ' + span if acc_change != 'n/a' else ''} | "
                     f"{_mean_sd(row.last['val_loss'], 3)} | "
                     f"{loss_change}{' ' + span if loss_change != 'n/a' else ''} | {row.best_is_last} of {row.n} |")
    return "\n".join(lines)


def _per_epoch_markdown(curves: dict[tuple[str, float], Curve], table: SweepTable) -> str:
    lines = ["| method | lr | epoch | " + " | ".join(CURVE_NAMES[k] for k in CURVE_KEYS) + " |",
             "|---|---|---|" + "---|" * len(CURVE_KEYS)]
    for lr in table.lrs:
        for method in table.methods:
            curve = curves.get((method, lr))
            for i, epoch in enumerate([] if curve is None else curve.epochs):
                cells = []
                for key in CURVE_KEYS:
                    mean, sd = curve.mean[key][i], curve.sd[key][i]
                    digits = 3 if key.endswith("loss") else 2
                    cells.append("n/a" if math.isnan(mean) else
                                 f"{mean:.{digits}f} ± {'n/a' if math.isnan(sd) else f'{sd:.{digits}f}'}")
                lines.append(f"| {table.label(method)} | {lr:g} | {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curves_section(runs: list[dict[str, Any]], table: SweepTable) -> str:
    rows = convergence_rows(runs, table)
    if not rows:
        return ""
    note = ("Mean ± sample sd over seeds. Loss: mean cross-entropy over the split (no label smoothing), with the BN "
            "statistics of the accuracy. Δ, last quarter: each run's value at its last epoch E minus its value at "
            "epoch E − ⌊E/4⌋ (at least one epoch back; the epochs in brackets), then averaged over seeds — near 0 when "
            "the curve has flattened. Best-validation epoch = last: runs whose first epoch with the highest validation "
            "accuracy (the epoch training selects) was the last one, i.e. still improving when training stopped. "
            f"Every epoch: `{CURVES_CSV}` and `{table.dataset}_learning_curves.png`.")
    per_epoch = _per_epoch_markdown(learning_curves(runs, table.dataset), table)
    return (f"\n### Learning curves ({table.dataset})\n\n{convergence_markdown(rows, table)}\n\n{note}\n\n"
            f"<details><summary>Per epoch: mean ± sample sd over seeds</summary>\n\n{per_epoch}\n\n</details>\n")


def gamma_change_markdown(runs: list[dict[str, Any]], table: SweepTable) -> str:
    """The "did γ move?" section: per method and learning rate, each run's ``gamma_change`` summarised over seeds;
    empty when no run of the table's data set recorded one."""
    cells = _cells(runs, table.dataset)
    lines = ["| method | lr | runs | mean \\|γ − γ_init\\| | largest \\|γ − γ_init\\| | mean \\|γ_init\\| |",
             "|---|---|---|---|---|---|"]
    for lr in table.lrs:
        for method in table.methods:
            changes = [run["final"].get("gamma_change") for run in cells.get((method, lr), [])]
            changes = [c for c in changes if c]
            if not changes:
                continue
            means = np.array([c["mean"] for c in changes])
            sd = f"{means.std(ddof=1):.3g}" if len(means) > 1 else "n/a"
            largest, start = max(c["max"] for c in changes), np.mean([c["initial_mean"] for c in changes])
            lines.append(f"| {table.label(method)} | {lr:g} | {len(changes)} | {means.mean():.3g} ± {sd} | "
                         f"{largest:.3g} | {start:.3g} |")
    if len(lines) == 2:
        return ""
    note = ("Per run, the mean over every BN γ entry (each channel of each BN layer that has a γ, the input BN "
            "included; layers without γ skipped) of |γ_final − γ_init|, γ_init as recorded when the run started; "
            "then mean ± sample sd over seeds. Largest: the largest single entry over all channels and seeds. "
            "Mean |γ_init|: the scale γ started from, to read the change against.")
    return f"\n### Did γ move? ({table.dataset})\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def training_markdown(runs: list[dict[str, Any]], table: SweepTable, curves: bool) -> str:
    """The sections on what the runs did, for under ``table``'s power section: how far γ moved (when the runs
    recorded it) and, with ``curves``, the learning curves and convergence table. Empty when neither applies."""
    return gamma_change_markdown(runs, table) + (_curves_section(runs, table) if curves else "")


def write_curves_csv(runs: list[dict[str, Any]], tables: list[SweepTable], path: Path) -> Path:
    """Every learning curve, one row per data set, method, learning rate and epoch: mean and sd over seeds."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "method", "label", "lr", "epoch", "n"] +
                        [f"{key}_{stat}" for key in CURVE_KEYS for stat in ("mean", "sd")])
        for table in tables:
            curves = learning_curves(runs, table.dataset)
            for lr in table.lrs:
                for method in table.methods:
                    curve = curves.get((method, lr))
                    for i, epoch in enumerate([] if curve is None else curve.epochs):
                        values = [f"{v[key][i]:.6f}" for key in CURVE_KEYS for v in (curve.mean, curve.sd)]
                        writer.writerow([table.dataset, method, table.label(method), lr, int(epoch), curve.n,
                                         *values])
    return path
