"""Reports of a sweep: mean ± std (n) per method and learning rate, paired t-tests against the baseline
(``scipy.stats.ttest_rel(method, base, alternative='greater')`` by default, ``'two-sided'`` when asked; pairs matched by
seed), optional Holm correction across the methods of a column, as Markdown, CSV and LaTeX, plus plots. Under every
table a power section: each method's mean difference to the baseline with its 95% CI, the smallest effect the design
detects with 80% power, and the seeds that would detect the observed difference (:mod:`.power`); two-sided, also
whether the CI excludes 0. When the runs recorded them, sections on what the runs did follow (:mod:`.convergence`):
how far γ moved, and the learning curves with a convergence table. Methods can be shown by readable labels
(``labels``); the CSV keeps the method strings. :func:`plan_from_pilot` plans a study from a pilot sweep.

A run that diverged enters every table and test with the accuracies its ``final.json`` holds, chance level (the rule of
docs/guide/comparisons.md, applied when the run ended, the same for every method); each cell counts its diverged runs,
and a note under the table lists them."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

from ..errors import BNInitError
from . import convergence, layout
from .power import (
    ALTERNATIVES,
    PowerInputError,
    PowerSummary,
    minimum_detectable_effect,
    power_summary,
    seeds_needed,
)
from .tables import ALPHA, Cell, SweepTable, ci_verdict, format_p

__all__ = ["IncompleteSweepError", "ReportInputError", "Cell", "SweepTable", "PilotRow", "load_sweep", "summarise",
           "holm", "diverged_note", "write_report", "power_markdown", "plan_from_pilot", "pilot_plan_text",
           "read_labels", "check_labels", "METRICS", "ALTERNATIVES"]

METRICS = layout.RESULT_METRICS
POWER = 0.8                 # the target power of every MDE and seed count in a report
PLANNED_SEEDS = 15          # docs/methods.md §6: the paper's 15 paired seeds


class IncompleteSweepError(BNInitError, RuntimeError):
    """Seed sets that cannot be paired; the message lists the missing runs."""


class ReportInputError(BNInitError, ValueError):
    """A report option that cannot be used: an unknown alternative, labels that are not a method → label mapping."""


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
              use_holm: bool = False, alternative: str = "greater",
              labels: Mapping[str, str] | None = None) -> list[SweepTable]:
    """One table per data set. Refuses (IncompleteSweepError) when any planned run has no result.

    Args:
        runs: the sweep's runs (:func:`load_sweep`).
        metric: ``best_val`` or ``last`` (:data:`METRICS`).
        baseline: the method every other is paired with.
        use_holm: Holm-correct the p-values across the methods of each column.
        alternative: ``greater`` (one-sided, the default) or ``two-sided``, scipy's names.
        labels: method → readable label for tables and plots (:func:`check_labels`); None shows the method strings.
    """
    if metric not in METRICS:
        raise IncompleteSweepError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
    if alternative not in ALTERNATIVES:
        raise ReportInputError(f"unknown alternative {alternative!r}; choose {', '.join(ALTERNATIVES)}")
    missing = [r for r in runs if r["final"] is None]
    if missing:
        lines = [f"  {r['run_dir']}: " + (f"failed ({r['error']})" if r["error"] else "not finished")
                 for r in missing]
        raise IncompleteSweepError(
            f"{len(missing)} of {len(runs)} planned runs have no result, so their seeds cannot be paired (nothing is "
            f"dropped silently):\n" + "\n".join(lines) + "\nFinish them with `compare.py run` (same arguments; "
            "--retry-failed for failed ones), or report a sweep planned without them.")
    labels = check_labels(labels, list(dict.fromkeys(r["method"] for r in runs)))
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
        table = SweepTable(dataset, metric, baseline, use_holm, methods, lrs, alternative=alternative,
                           labels={m: labels[m] for m in methods if m in labels})
        for method in methods:
            for lr in lrs:
                chosen = sorted((r for r in dataset_runs if r["method"] == method and r["lr"] == lr),
                                key=lambda r: r["seed"])
                if chosen:
                    table.cells[(method, lr)] = Cell(method, lr, [r["seed"] for r in chosen],
                                                     [float(r["final"][METRICS[metric]]) for r in chosen],
                                                     diverged=[r["seed"] for r in chosen
                                                               if layout.is_diverged(r["final"])])
        for lr in lrs:
            _test_column(table, lr)
        tables.append(table)
    return tables


def _test_column(table: SweepTable, lr: float) -> None:
    """Test every method of one learning rate against the baseline (paired by seed), then Holm across them."""
    base = table.cells.get((table.baseline, lr))
    compared = [c for (m, cell_lr), c in table.cells.items() if cell_lr == lr and m != table.baseline]
    for cell in compared:
        if base is None or cell.seeds != base.seeds:
            raise IncompleteSweepError(
                f"{table.dataset}, lr {lr:g}: {cell.method} has seeds {cell.seeds} but {table.baseline} has "
                f"{base.seeds if base else 'none'}; paired tests need the same seeds")
        if cell.n < 2:
            cell.p = float("nan")
            continue
        result = stats.ttest_rel(cell.values, base.values, alternative=table.alternative)
        cell.t, cell.p = float(result.statistic), float(result.pvalue)
        cell.power = power_summary(cell.values, base.values, alpha=ALPHA, power=POWER, alternative=table.alternative)
    for cell, adjusted in zip(compared, holm([c.p for c in compared])):
        cell.p_holm = adjusted


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """Method → label from a YAML file (``bn_gamma1+gamma_init=0.269+gamma_lr_div=1: BN γ0=0.269``, one a line)."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"labels file {str(path)!r} does not exist (give a YAML file of method: label lines)")
    try:
        labels = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ReportInputError(f"{path} is not YAML ({str(error).splitlines()[0]}); write one method: label a "
                               f"line") from None
    return check_labels(labels, None, where=str(path))


def check_labels(labels: Any, methods: list[str] | None, where: str = "labels") -> dict[str, str]:
    """``labels`` checked as a mapping of method string → non-empty label, every label distinct and, when ``methods``
    is given, every method among them (a label for a method the sweep does not have is a typo). None gives {}."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                  for k, v in labels.items()):
        raise ReportInputError(f"{where}: labels must map method strings to non-empty label strings (e.g. "
                               f"'bn_gamma01: γ-init'), got {labels!r}")
    unknown = [m for m in labels if methods is not None and m not in methods]
    if unknown:
        raise ReportInputError(f"{where}: labels name methods that are not in the sweep: {', '.join(unknown)}; "
                               f"its methods are {', '.join(methods)}")
    seen: dict[str, str] = {}
    for method, label in labels.items():
        if label in seen:
            raise ReportInputError(f"{where}: {seen[label]!r} and {method!r} have the same label {label!r}; give each "
                                   f"method its own, so tables and plots can tell them apart")
        seen[label] = method
    return dict(labels)


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    std = "n/a" if math.isnan(cell.std) else f"{cell.std:.2f}"
    return f"{cell.mean:.2f} ± {std} ({cell.n}{f'; {len(cell.diverged)} diverged' if cell.diverged else ''})"


def diverged_note(table: SweepTable) -> str:
    """The runs of ``table`` that diverged, per method and learning rate, and how they entered it ("" when none)."""
    cells = [cell for lr in table.lrs for method in table.methods
             if (cell := table.cells.get((method, lr))) is not None and cell.diverged]
    if not cells:
        return ""
    listed = "; ".join(f"{cell.method} at lr {cell.lr:g}: {len(cell.diverged)} of {cell.n} (seed"
                       f"{'s' if len(cell.diverged) > 1 else ''} {', '.join(map(str, cell.diverged))})"
                       for cell in cells)
    chance = cells[0].values[cells[0].seeds.index(cells[0].diverged[0])]
    return (f"Diverged runs (a non-finite training loss stopped them): {listed}. Each enters the means and the paired "
            f"tests at chance level, 100/k % for k classes ({chance:.2f}% here), at every endpoint, whatever its "
            f"method (docs/guide/comparisons.md); its {layout.FINAL_FILE} says where it diverged.\n")


def markdown(table: SweepTable) -> str:
    p_name = "p (Holm)" if table.holm else "p"
    header = ["method"] + [h for lr in table.lrs for h in (f"lr {lr:g}", f"{p_name}, lr {lr:g}")]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in table.methods:
        row = [f"{table.label(method)} (baseline)" if method == table.baseline else table.label(method)]
        for lr in table.lrs:
            cell = table.cells.get((method, lr))
            text = _cell_text(cell)
            if cell is not None and cell.significant(table.holm):
                text = f"**{text}**"
            row += [text, format_p(None if cell is None else (cell.p_holm if table.holm else cell.p))]
        rows.append("| " + " | ".join(row) + " |")
    metric = "test accuracy at the best-validation epoch" if table.metric == "best_val" else \
        "test accuracy at the last epoch"
    sided = "one-sided" if table.alternative == "greater" else "two-sided"
    test = f"scipy.stats.ttest_rel(method, {table.baseline}, alternative='{table.alternative}')"
    holm = "; Holm-corrected across the methods of each column" if table.holm else ""
    note = (f"\n{table.dataset}: top-1 {metric}, mean ± sample std (n seeds). p: {sided} paired t-test against "
            f"{table.label(table.baseline)} ({test}, pairs matched by seed){holm}. Bold: p ≤ {ALPHA}."
            f"{_labels_note(table)}\n")
    diverged = diverged_note(table)
    return "\n".join(rows) + "\n" + note + (f"\n{diverged}" if diverged else "")


def _labels_note(table: SweepTable) -> str:
    """With labels, the method string behind each one (the CSV's ``method`` column), so a table reads back."""
    if not table.labels:
        return ""
    shown = "; ".join(f"{label} = `{method}`" for method, label in table.labels.items())
    return f" Labels: {shown}."


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def _seeds_text(summary: PowerSummary) -> str:
    """Seeds needed for the observed difference, or why there is no such number."""
    if summary.n_needed_for_observed is not None:
        return str(summary.n_needed_for_observed)
    if summary.sd_diff == 0:
        return "n/a (no spread)"
    if summary.alternative == "two-sided" and summary.mean_diff == 0:
        return "never (observed = 0)"
    if summary.alternative != "two-sided" and summary.mean_diff <= 0:
        return "never (observed ≤ 0)"
    return f"> {summary.max_n:,}"


def power_markdown(table: SweepTable) -> str:
    """The power section under a table: for each method against the baseline, per learning rate, the mean paired
    difference with its 95% CI, the minimum detectable effect of this design and the seeds the observed difference
    would need; for a two-sided table also whether the CI excludes 0, and on which side."""
    two_sided = table.alternative == "two-sided"
    rows = ["| method | lr | mean difference [95% CI] | sd of differences | n | MDE at 80% power | "
            "seeds to detect the observed difference |" + (" CI excludes 0 |" if two_sided else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if two_sided else "")]
    for lr in table.lrs:
        for method in table.methods:
            cell = table.cells.get((method, lr))
            if method == table.baseline or cell is None or cell.power is None:
                continue
            summary = cell.power
            mde = "n/a" if math.isnan(summary.mde) else f"{summary.mde:.2f}"
            rows.append(f"| {table.label(method)} | {lr:g} | {_signed(summary.mean_diff)} [{_signed(summary.ci_low)}, "
                        f"{_signed(summary.ci_high)}] | {summary.sd_diff:.2f} | {summary.n} | {mde} | "
                        f"{_seeds_text(summary)} |" + (f" {ci_verdict(summary)} |" if two_sided else ""))
    if len(rows) == 2:
        return (f"### Power ({table.dataset})\n\nNo method has two or more seeds paired with {table.baseline}, so "
                f"there is no difference to analyse.\n")
    holm_note = (" The p-values above are Holm-corrected, which lowers each method's level below α, so these MDEs "
                 "and seed counts are lower bounds for the corrected test." if table.holm else "")
    test = ("one-sided paired t-test" if not two_sided else
            "two-sided paired t-test (the size of a difference in either direction)")
    note = (f"\nDifferences are method − {table.label(table.baseline)} per seed, in percentage points. 95% CI: "
            f"two-sided, paired t (mean ± t(0.975, n − 1)·sd/√n). MDE: the smallest true mean difference that this "
            f"design (n seeds, this sd) detects with {POWER:.0%} power in the {test} at α = {ALPHA} "
            f"(noncentral t, the sd taken as known). Seeds: the fewest paired seeds with {POWER:.0%} power for a true "
            f"difference equal to the observed mean.{holm_note}{_direction_note(table)}\n")
    return f"### Power ({table.dataset})\n\n" + "\n".join(rows) + "\n" + note


def _direction_note(table: SweepTable) -> str:
    """Two-sided: how to read the direction column (the CI is the unadjusted one, whatever the p-values)."""
    if table.alternative != "two-sided":
        return ""
    return (" CI excludes 0: whether the 95% CI lies wholly above or below 0 — the direction a difference may be "
            "claimed in; it is the unadjusted interval, so with Holm a CI can exclude 0 beside a corrected p above "
            f"{ALPHA}.")


def latex(table: SweepTable) -> str:
    def esc(text: str) -> str:
        return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    columns = "l" + "rr" * len(table.lrs)
    header = "method & " + " & ".join(f"$\\alpha={lr:g}$ & $p$" for lr in table.lrs) + r" \\"
    lines = [r"\begin{tabular}{" + columns + "}", r"\toprule", header, r"\midrule"]
    for method in table.methods:
        parts = [esc(table.label(method))]
        for lr in table.lrs:
            cell = table.cells.get((method, lr))
            if cell is None:
                parts += ["--", "--"]
                continue
            std = "n/a" if math.isnan(cell.std) else f"{cell.std:.2f}"
            text = f"{cell.mean:.2f} $\\pm$ {std}" + (f" ({len(cell.diverged)} div.)" if cell.diverged else "")
            if cell.significant(table.holm):
                text = f"\\textbf{{{text}}}"
            p = cell.p_holm if table.holm else cell.p
            parts += [text, "--" if p is None else esc(format_p(p))]
        lines.append(" & ".join(parts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _power_columns(summary: PowerSummary | None) -> list[str]:
    """The CSV's power columns; empty for the baseline, ``nan`` for an undefined MDE, empty for "no seed count"."""
    if summary is None:
        return [""] * 6
    return [f"{summary.mean_diff:.6f}", f"{summary.ci_low:.6f}", f"{summary.ci_high:.6f}", f"{summary.sd_diff:.6f}",
            f"{summary.mde:.6f}", "" if summary.n_needed_for_observed is None else str(summary.n_needed_for_observed)]


def write_csv(tables: list[SweepTable], path: Path) -> None:
    """``report.csv``: one row per method and learning rate; ``method`` is always the method string. A report with
    diverged runs adds ``diverged`` and ``diverged_seeds`` columns, one with labels a ``label`` column, a two-sided
    one ``alternative`` and ``ci_excludes_zero``, after the others (a default report's columns are exactly as they
    have always been)."""
    with_diverged = any(cell.diverged for table in tables for cell in table.cells.values())
    labelled = any(table.labels for table in tables)
    two_sided = any(table.alternative == "two-sided" for table in tables)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "metric", "method", "lr", "n", "mean", "std", "t", "p", "p_holm",
                         "significant", "baseline", "seeds", "values", "mean_diff", "ci_low", "ci_high", "sd_diff",
                         "mde", "n_needed_for_observed"] + (["diverged", "diverged_seeds"] if with_diverged else [])
                        + (["label"] if labelled else []) + (["alternative", "ci_excludes_zero"] if two_sided else []))
        for table in tables:
            for (method, lr), cell in table.cells.items():
                extra = ([len(cell.diverged), " ".join(map(str, cell.diverged))] if with_diverged else []) + (
                    [table.label(method)] if labelled else []) + (
                    [table.alternative, "" if cell.power is None else ci_verdict(cell.power)] if two_sided else [])
                writer.writerow([table.dataset, table.metric, method, lr, cell.n, f"{cell.mean:.6f}",
                                 f"{cell.std:.6f}", "" if cell.t is None else f"{cell.t:.6f}",
                                 "" if cell.p is None else f"{cell.p:.6g}",
                                 "" if cell.p_holm is None else f"{cell.p_holm:.6g}",
                                 cell.significant(table.holm), table.baseline,
                                 " ".join(map(str, cell.seeds)), " ".join(f"{v:.4f}" for v in cell.values),
                                 *_power_columns(cell.power), *extra])


def write_report(out: str | os.PathLike, report_dir: str | os.PathLike | None = None, metric: str = "best_val",
                 baseline: str = "base", use_holm: bool = False, plots: bool = True, alternative: str = "greater",
                 labels: Mapping[str, str] | None = None, curves: bool | None = None) -> list[Path]:
    """Write ``report.md``, ``report.csv``, ``report_<dataset>.tex`` and the plots into ``report_dir``.

    Args:
        out: the sweep directory.
        report_dir: where to write (default ``<out>/report``).
        metric: ``best_val`` or ``last``: the test accuracy compared.
        baseline: the method every other is paired with.
        use_holm: Holm-correct the p-values across the methods of each column.
        plots: draw the PNGs too (matplotlib).
        alternative: ``greater`` (one-sided, the default) or ``two-sided``; see :func:`summarise`.
        labels: method → readable label shown in every table and plot (the CSV keeps the method strings too).
        curves: the learning-curve section, its CSV and its plot: None (default) when the runs recorded a
            validation loss per epoch (:func:`.convergence.has_losses`), True always, False never.

    Returns:
        The files written. With the defaults, a sweep whose runs recorded neither losses nor γ changes (every sweep
        run before they were recorded) gives exactly the report it always gave.
    """
    runs = load_sweep(out)
    tables = summarise(runs, metric=metric, baseline=baseline, use_holm=use_holm, alternative=alternative,
                       labels=labels)
    report_dir = Path(report_dir or Path(out) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with_curves = convergence.has_losses(runs) if curves is None else curves
    md = "\n".join(f"## {t.dataset}\n\n{markdown(t)}\n{power_markdown(t)}"
                    f"{convergence.training_markdown(runs, t, with_curves)}" for t in tables)
    (report_dir / "report.md").write_text(md)
    write_csv(tables, report_dir / "report.csv")
    written += [report_dir / "report.md", report_dir / "report.csv"]
    if with_curves:
        written.append(convergence.write_curves_csv(runs, tables, report_dir / convergence.CURVES_CSV))
    for table in tables:
        tex = report_dir / f"report_{table.dataset}.tex"
        tex.write_text(latex(table))
        written.append(tex)
    if plots:
        # matplotlib costs about 1-2 s to import here: a --no-plots report does not pay it
        from .plots import plot_sweep

        written += plot_sweep(runs, report_dir, tables, curves=with_curves)
    return written


@dataclass(frozen=True)
class PilotRow:
    """One method and learning rate of a pilot sweep, as a plan for the confirmatory study.

    Attributes:
        dataset: the data set of the pilot's table.
        method: the method compared with the baseline.
        lr: the learning rate.
        n: paired seeds in the pilot.
        sd_diff: sample std of the pilot's per-seed differences (method − baseline).
        seeds_for_effect: fewest paired seeds that detect the planned effect with the target power; None when the
            pilot's differences have no spread or more than the search limit would be needed.
        mde_at_pilot: minimum detectable effect with the pilot's n (NaN without spread).
        mde_at_planned: minimum detectable effect with the planned number of seeds (NaN without spread).
    """

    dataset: str
    method: str
    lr: float
    n: int
    sd_diff: float
    seeds_for_effect: int | None
    mde_at_pilot: float
    mde_at_planned: float


def plan_from_pilot(pilot: str | os.PathLike, effect: float, alpha: float = ALPHA, power: float = POWER,
                    metric: str = "best_val", baseline: str = "base", planned_seeds: int = PLANNED_SEEDS,
                    max_n: int = 10_000, alternative: str = "greater") -> list[PilotRow]:
    """Plan a study from a finished pilot sweep: per method and learning rate, the sd of the paired differences,
    the seeds needed to detect ``effect`` and the minimum detectable effect at the pilot's and the planned n.

    Args:
        pilot: the pilot's sweep directory (every planned run finished, at least two seeds, a baseline and another
            method).
        effect: the true mean difference to detect, in the metric's unit (percentage points).
        alpha: level of the paired t-test.
        power: target power.
        metric: ``best_val`` or ``last`` (as for the report).
        baseline: the method every other is paired with.
        planned_seeds: the confirmatory study's number of seeds, for the last column.
        max_n: largest number of seeds searched.
        alternative: ``greater`` (one-sided, the default) or ``two-sided``: the planned test.

    Raises:
        PowerInputError: a non-positive effect, levels out of range, or a pilot without a paired comparison.
        IncompleteSweepError: the pilot has unfinished runs or unpaired seeds.
    """
    if not (math.isfinite(effect) and effect > 0):
        raise PowerInputError(f"the effect to detect must be a positive number of percentage points, got {effect!r}")
    if planned_seeds < 2:
        raise PowerInputError(f"planned seeds must be at least 2 for a paired t-test, got {planned_seeds}")
    rows = []
    for table in summarise(load_sweep(pilot), metric=metric, baseline=baseline, alternative=alternative):
        for lr in table.lrs:
            for method in table.methods:
                cell = table.cells.get((method, lr))
                if method == baseline or cell is None or cell.power is None:
                    continue
                sd = cell.power.sd_diff
                if sd > 0:
                    needed = seeds_needed(effect, sd, alpha, power, max_n, alternative)
                    at_pilot = minimum_detectable_effect(sd, cell.n, alpha, power, alternative)
                    at_planned = minimum_detectable_effect(sd, planned_seeds, alpha, power, alternative)
                else:
                    needed, at_pilot, at_planned = None, float("nan"), float("nan")
                rows.append(PilotRow(table.dataset, method, lr, cell.n, sd, needed, at_pilot, at_planned))
    if not rows:
        raise PowerInputError(f"{pilot} has no method paired with {baseline!r} on two or more seeds, so there are no "
                              "differences to estimate the spread from; run the pilot with the baseline and at least "
                              "one other method on the same seeds (two or more)")
    return rows


def pilot_plan_text(rows: list[PilotRow], effect: float, alpha: float = ALPHA, power: float = POWER,
                    planned_seeds: int = PLANNED_SEEDS, max_n: int = 10_000, alternative: str = "greater") -> str:
    """The plan as an aligned text table, one line per method and learning rate."""
    def number(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    def seeds(row: PilotRow) -> str:
        if row.seeds_for_effect is not None:
            return str(row.seeds_for_effect)
        return "n/a (no spread)" if row.sd_diff == 0 else f"> {max_n}"

    header = ["dataset", "method", "lr", "pilot n", "sd of differences", f"seeds for +{effect:g}",
              "MDE at pilot n", f"MDE at {planned_seeds} seeds"]
    body = [[row.dataset, row.method, f"{row.lr:g}", str(row.n), number(row.sd_diff), seeds(row),
             number(row.mde_at_pilot), number(row.mde_at_planned)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [header, *body]]
    sided = "Two-sided" if alternative == "two-sided" else "One-sided"
    note = (f"{sided} paired t-test against the baseline at α = {alpha:g}, power {power:g} (noncentral t, the "
            f"pilot's sd taken as the true one). Effects and MDEs in percentage points.")
    return "\n".join([*lines, "", note])
