"""Reports of a sweep: mean ± std (n) per method and learning rate, one-sided paired t-tests against the baseline
(``scipy.stats.ttest_rel(method, base, alternative='greater')``, pairs matched by seed), optional Holm correction
across the methods of a column, as Markdown, CSV and LaTeX, plus plots."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..errors import BNInitError
from . import layout

__all__ = ["IncompleteSweepError", "Cell", "SweepTable", "load_sweep", "summarise", "holm", "write_report",
           "METRICS"]

METRICS = layout.RESULT_METRICS
ALPHA = 0.05


class IncompleteSweepError(BNInitError, RuntimeError):
    """Seed sets that cannot be paired; the message lists the missing runs."""


@dataclass
class Cell:
    method: str
    lr: float
    seeds: list[int]
    values: list[float]
    p: float | None = None          # one-sided paired t-test against the baseline (None for the baseline)
    p_holm: float | None = None
    t: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")

    def significant(self, use_holm: bool) -> bool:
        p = self.p_holm if use_holm else self.p
        return p is not None and not math.isnan(p) and p <= ALPHA


@dataclass
class SweepTable:
    dataset: str
    metric: str
    baseline: str
    holm: bool
    methods: list[str]
    lrs: list[float]
    cells: dict[tuple[str, float], Cell] = field(default_factory=dict)


def load_sweep(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every planned run of the sweep in ``out`` with its status and, when finished, its ``final.json``."""
    return list(layout.sweep_runs(out))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; NaN stays NaN and does not count)."""
    finite = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[index] = running
    return adjusted


def summarise(runs: list[dict[str, Any]], metric: str = "best_val", baseline: str = "base",
              use_holm: bool = False) -> list[SweepTable]:
    """One table per data set. Refuses (IncompleteSweepError) when any planned run has no result."""
    if metric not in METRICS:
        raise IncompleteSweepError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
    missing = [r for r in runs if r["final"] is None]
    if missing:
        lines = [f"  {r['run_dir']}: " + (f"failed ({r['error']})" if r["error"] else "not finished")
                 for r in missing]
        raise IncompleteSweepError(
            f"{len(missing)} of {len(runs)} planned runs have no result, so their seeds cannot be paired (nothing is "
            f"dropped silently):\n" + "\n".join(lines) + "\nFinish them with `compare.py run` (same arguments; "
            "--retry-failed for failed ones), or report a sweep planned without them.")
    tables = []
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_dataset[run.get("dataset", "?")].append(run)
    for dataset, dataset_runs in sorted(by_dataset.items()):
        methods = list(dict.fromkeys(r["method"] for r in dataset_runs))
        lrs = sorted({r["lr"] for r in dataset_runs}, reverse=True)
        if baseline not in methods:
            raise IncompleteSweepError(f"{dataset}: the baseline {baseline!r} is not among the methods "
                                       f"({', '.join(methods)}); run it, or pass --baseline")
        table = SweepTable(dataset, metric, baseline, use_holm, methods, lrs)
        for method in methods:
            for lr in lrs:
                chosen = sorted((r for r in dataset_runs if r["method"] == method and r["lr"] == lr),
                                key=lambda r: r["seed"])
                if chosen:
                    table.cells[(method, lr)] = Cell(method, lr, [r["seed"] for r in chosen],
                                                     [float(r["final"][METRICS[metric]]) for r in chosen])
        for lr in lrs:
            base = table.cells.get((baseline, lr))
            compared = [c for (m, cell_lr), c in table.cells.items() if cell_lr == lr and m != baseline]
            for cell in compared:
                if base is None or cell.seeds != base.seeds:
                    raise IncompleteSweepError(
                        f"{dataset}, lr {lr:g}: {cell.method} has seeds {cell.seeds} but {baseline} has "
                        f"{base.seeds if base else 'none'}; paired tests need the same seeds")
                if cell.n < 2:
                    cell.p = float("nan")
                    continue
                result = stats.ttest_rel(cell.values, base.values, alternative="greater")
                cell.t, cell.p = float(result.statistic), float(result.pvalue)
            for cell, adjusted in zip(compared, holm([c.p for c in compared])):
                cell.p_holm = adjusted
        tables.append(table)
    return tables


def _format_p(p: float | None) -> str:
    if p is None:
        return "—"
    if math.isnan(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    std = "n/a" if math.isnan(cell.std) else f"{cell.std:.2f}"
    return f"{cell.mean:.2f} ± {std} ({cell.n})"


def markdown(table: SweepTable) -> str:
    p_name = "p (Holm)" if table.holm else "p"
    header = ["method"] + [h for lr in table.lrs for h in (f"lr {lr:g}", f"{p_name}, lr {lr:g}")]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in table.methods:
        row = [f"{method} (baseline)" if method == table.baseline else method]
        for lr in table.lrs:
            cell = table.cells.get((method, lr))
            text = _cell_text(cell)
            if cell is not None and cell.significant(table.holm):
                text = f"**{text}**"
            row += [text, _format_p(None if cell is None else (cell.p_holm if table.holm else cell.p))]
        rows.append("| " + " | ".join(row) + " |")
    metric = "test accuracy at the best-validation epoch" if table.metric == "best_val" else \
        "test accuracy at the last epoch"
    note = (f"\n{table.dataset}: top-1 {metric}, mean ± sample std (n seeds). p: one-sided paired t-test against "
            f"{table.baseline} (scipy.stats.ttest_rel(method, {table.baseline}, alternative='greater'), pairs matched "
            f"by seed){'; Holm-corrected across the methods of each column' if table.holm else ''}. "
            f"Bold: p ≤ {ALPHA}.\n")
    return "\n".join(rows) + "\n" + note


def latex(table: SweepTable) -> str:
    def esc(text: str) -> str:
        return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    columns = "l" + "rr" * len(table.lrs)
    header = "method & " + " & ".join(f"$\\alpha={lr:g}$ & $p$" for lr in table.lrs) + r" \\"
    lines = [r"\begin{tabular}{" + columns + "}", r"\toprule", header, r"\midrule"]
    for method in table.methods:
        parts = [esc(method)]
        for lr in table.lrs:
            cell = table.cells.get((method, lr))
            if cell is None:
                parts += ["--", "--"]
                continue
            std = "n/a" if math.isnan(cell.std) else f"{cell.std:.2f}"
            text = f"{cell.mean:.2f} $\\pm$ {std}"
            if cell.significant(table.holm):
                text = f"\\textbf{{{text}}}"
            p = cell.p_holm if table.holm else cell.p
            parts += [text, "--" if p is None else esc(_format_p(p))]
        lines.append(" & ".join(parts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(tables: list[SweepTable], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "metric", "method", "lr", "n", "mean", "std", "t", "p", "p_holm",
                         "significant", "baseline", "seeds", "values"])
        for table in tables:
            for (method, lr), cell in table.cells.items():
                writer.writerow([table.dataset, table.metric, method, lr, cell.n, f"{cell.mean:.6f}",
                                 f"{cell.std:.6f}", "" if cell.t is None else f"{cell.t:.6f}",
                                 "" if cell.p is None else f"{cell.p:.6g}",
                                 "" if cell.p_holm is None else f"{cell.p_holm:.6g}",
                                 cell.significant(table.holm), table.baseline,
                                 " ".join(map(str, cell.seeds)), " ".join(f"{v:.4f}" for v in cell.values)])


def write_report(out: str | os.PathLike, report_dir: str | os.PathLike | None = None, metric: str = "best_val",
                 baseline: str = "base", use_holm: bool = False, plots: bool = True) -> list[Path]:
    """Write ``report.md``, ``report.csv``, ``report_<dataset>.tex`` and the plots into ``report_dir``."""
    runs = load_sweep(out)
    tables = summarise(runs, metric=metric, baseline=baseline, use_holm=use_holm)
    report_dir = Path(report_dir or Path(out) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    md = "\n".join(f"## {t.dataset}\n\n{markdown(t)}" for t in tables)
    (report_dir / "report.md").write_text(md)
    write_csv(tables, report_dir / "report.csv")
    written += [report_dir / "report.md", report_dir / "report.csv"]
    for table in tables:
        tex = report_dir / f"report_{table.dataset}.tex"
        tex.write_text(latex(table))
        written.append(tex)
    if plots:
        from .plots import plot_sweep

        written += plot_sweep(runs, report_dir)
    return written
