"""The report's power section and CSV columns (issue 10, point 3), on sweep folders written through the layout
module, checked against numbers written out here and scipy's t and noncentral t evaluated by hand."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import brentq

from timm_bninit.experiment import layout
from timm_bninit.experiment.report import holm, write_report


def _power_sweep(out: Path, values: dict[tuple[str, float], list[float]], seeds: list[int], dataset: str = "fake"):
    """A finished sweep folder written through the layout module, with the given test accuracies per cell."""
    entries = []
    for (method, lr), accuracies in values.items():
        for seed, accuracy in zip(seeds, accuracies, strict=True):
            run_dir = layout.sweep_run_dir(out, method, lr, seed)
            run_dir.mkdir(parents=True)
            layout.write_final(run_dir, {"test_acc_at_best_val": accuracy, "test_acc_last": accuracy - 1.0})
            entries.append({"method": method, "lr": lr, "seed": seed, "recipe": "fake", "dataset": dataset,
                            "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, entries)
    return out


def _mde_by_hand(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    critical = stats.t.ppf(1 - alpha, n - 1)
    nc = brentq(lambda nc: stats.nct.sf(critical, n - 1, nc) - power, 0, 50, xtol=1e-12)
    return nc * sd / math.sqrt(n)


def _seeds_by_hand(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    n = 2
    while stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n) / sd) < power:
        n += 1
    return n


POWER_BASE = [90.0, 90.5, 91.0, 89.0, 89.0]
POWER_NEW = [91.0, 90.0, 92.5, 89.5, 90.5]       # differences 1.0, -0.5, 1.5, 0.5, 1.5: mean 0.8, sd sqrt(0.7)
POWER_WORSE = [89.0, 90.0, 90.0, 88.5, 88.0]     # differences -1, -0.5, -1, -0.5, -1


def test_report_has_a_power_section_after_each_table(tmp_path):
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW,
                                            ("worse", 0.1): POWER_WORSE, ("same", 0.1): list(POWER_BASE)},
                       [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("| method | lr 0.1 |") < md.index("Bold: p ≤ 0.05") < md.index("### Power (fake)")
    power_part = md[md.index("### Power (fake)"):]
    sd = math.sqrt(0.7)
    half = 2.7764451051977987 * sd / math.sqrt(5)    # t(0.975, 4) = 2.776 in any table
    mde = _mde_by_hand(sd, 5)
    better = next(line for line in power_part.splitlines() if line.startswith("| better |"))
    assert better == (f"| better | 0.1 | +0.80 [{0.8 - half:+.2f}, {0.8 + half:+.2f}] | 0.84 | 5 | {mde:.2f} | "
                      f"{_seeds_by_hand(0.8, sd)} |").replace("-", "−")
    assert "[−0.24, +1.84]" in better
    worse = next(line for line in power_part.splitlines() if line.startswith("| worse |"))
    assert worse.startswith("| worse | 0.1 | −0.80 [") and worse.endswith("| never (observed ≤ 0) |")
    same = next(line for line in power_part.splitlines() if line.startswith("| same |"))
    assert same.endswith("| 0.00 | 5 | n/a | n/a (no spread) |")
    assert "| base |" not in power_part
    assert "80% power in the one-sided paired t-test at α = 0.05" in power_part


def test_report_csv_has_the_power_columns(tmp_path):
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW}, [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False)
    with open(tmp_path / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    sd = math.sqrt(0.7)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    better = rows["better"]
    assert float(better["mean_diff"]) == pytest.approx(0.8, abs=1e-6)
    assert float(better["ci_low"]) == pytest.approx(0.8 - half, abs=1e-6)
    assert float(better["ci_high"]) == pytest.approx(0.8 + half, abs=1e-6)
    assert float(better["sd_diff"]) == pytest.approx(sd, abs=1e-6)
    assert float(better["mde"]) == pytest.approx(_mde_by_hand(sd, 5), abs=1e-6)
    assert int(better["n_needed_for_observed"]) == _seeds_by_hand(0.8, sd)
    assert float(better["p"]) == pytest.approx(stats.ttest_rel(POWER_NEW, POWER_BASE, alternative="greater").pvalue,
                                               rel=1e-5)
    assert [rows["base"][key] for key in ("mean_diff", "ci_low", "ci_high", "sd_diff", "mde",
                                          "n_needed_for_observed")] == [""] * 6


def test_report_power_section_notes_holm(tmp_path):
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW}, [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False, use_holm=True)
    assert "lower bounds for the corrected test" in (tmp_path / "report" / "report.md").read_text()


def test_holm_matches_hand_computation():
    # sorted p: 0.01, 0.02, 0.04 with m = 3 -> 0.03, 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, float("nan"), 0.01])[2] == pytest.approx(0.02)
    assert np.isnan(holm([0.5, float("nan"), 0.01])[1])


# --- the default report stays as it was -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _sweep_from_summaries(out: Path, summaries: list[dict]) -> Path:
    """A committed study part's sweep folder again, from its summaries.json (what its report was computed from)."""
    entries = []
    for run in summaries:
        run_dir = layout.sweep_run_dir(out, run["method"], run["lr"], run["seed"])
        run_dir.mkdir(parents=True)
        layout.write_final(run_dir, {k: run[k] for k in ("test_acc_at_best_val", "test_acc_last")})
        entries.append({"method": run["method"], "lr": run["lr"], "seed": run["seed"], "dataset": run["dataset"],
                        "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, entries)
    return out


@pytest.mark.parametrize(("study", "part"), [("v2", "scratch"), ("v3", "scratch"), ("v3", "finetune")])
def test_the_committed_studies_report_byte_for_byte_as_committed(tmp_path, study, part):
    """The report each study wrote (its protocol has no analysis block, so today's defaults), written again now from
    its own summaries: every byte of report.md, report.csv and the LaTeX table is the same, and nothing new is added.
    (v1's reports predate the power section.)"""
    from timm_bninit.experiment.study import load_protocol, report_options

    folder = ROOT / "studies" / study / part
    out = _sweep_from_summaries(tmp_path / "sweep", json.loads((folder / "summaries.json").read_text()))
    options = report_options(load_protocol(ROOT / "studies" / study)["parts"][part])
    assert options == {"metric": "best_val", "alternative": "greater", "use_holm": True, "baseline": "base",
                       "labels": None}
    written = write_report(out, tmp_path / "report", plots=False, **options)
    assert sorted(p.name for p in written) == ["report.csv", "report.md", "report_digits.tex"]
    for path in written:
        assert path.read_bytes() == (folder / path.name).read_bytes(), path.name


# --- two-sided reading ----------------------------------------------------------------------------------------

POWER_MUCH = [92.0, 92.0, 93.5, 91.0, 90.5]     # differences 2, 1.5, 2.5, 2, 1.5: CI above 0


def _two_sided_mde_by_hand(sd: float, n: int) -> float:
    critical = stats.t.ppf(0.975, n - 1)
    # both tails: P(T' > c) + P(T' < −c), the second as P(−T' > c) with −T' ~ nct(−λ) (scipy's cdf is NaN at some λ)
    nc = brentq(lambda nc: stats.nct.sf(critical, n - 1, nc) + stats.nct.sf(critical, n - 1, -nc) - 0.8, 0, 50,
                xtol=1e-12)
    return nc * sd / math.sqrt(n)


def test_two_sided_report(tmp_path):
    values = {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW, ("worse", 0.1): POWER_WORSE,
              ("much", 0.1): POWER_MUCH}
    out = _power_sweep(tmp_path / "sweep", values, [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False, use_holm=True, alternative="two-sided")
    md = (tmp_path / "report" / "report.md").read_text()
    others = ["better", "worse", "much"]
    p = [stats.ttest_rel(values[(m, 0.1)], POWER_BASE, alternative="two-sided").pvalue for m in others]
    order = np.argsort(p)  # Holm by hand: sorted p × (3, 2, 1), running maximum, capped at 1
    adjusted, running = [0.0] * 3, 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[index]))
        adjusted[index] = running
    for method, holm_p in zip(others, adjusted):
        row = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
        assert row.endswith(f"| {holm_p:.3g} |" if holm_p >= 1e-3 else f"| {holm_p:.1e} |")
    assert "p: two-sided paired t-test against base (scipy.stats.ttest_rel(method, base, alternative='two-sided')" in md
    power_part = md[md.index("### Power (fake)"):]
    assert "| CI excludes 0 |" in power_part and "in the two-sided paired t-test" in power_part
    verdicts = {"better": "no", "worse": "yes: below 0", "much": "yes: above 0"}
    for method in others:
        diff = np.subtract(values[(method, 0.1)], POWER_BASE)
        sd = diff.std(ddof=1)
        half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
        assert (diff.mean() - half > 0 or diff.mean() + half < 0) == (verdicts[method] != "no")
        line = next(line for line in power_part.splitlines() if line.startswith(f"| {method} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[5] == f"{_two_sided_mde_by_hand(sd, 5):.2f}" and cells[7] == verdicts[method]
    with open(tmp_path / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    for method, raw_p in zip(others, p):
        assert float(rows[method]["p"]) == pytest.approx(raw_p, rel=1e-5)
        assert rows[method]["alternative"] == "two-sided" and rows[method]["ci_excludes_zero"] == verdicts[method]
        diff = np.subtract(values[(method, 0.1)], POWER_BASE)
        assert float(rows[method]["mde"]) == pytest.approx(_two_sided_mde_by_hand(diff.std(ddof=1), 5), abs=1e-6)
    assert rows["base"]["ci_excludes_zero"] == ""
    # the same sweep read one-sided keeps today's columns and words
    write_report(out, tmp_path / "one", plots=False, use_holm=True)
    one = (tmp_path / "one" / "report.md").read_text()
    assert "CI excludes 0" not in one and "alternative='greater'" in one
    assert "alternative" not in (tmp_path / "one" / "report.csv").read_text().splitlines()[0]


def test_unknown_alternative_is_refused(tmp_path):
    from timm_bninit.experiment.report import ReportInputError

    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW}, [1, 2, 3, 4, 5])
    with pytest.raises(ReportInputError, match="unknown alternative 'less'; choose greater, two-sided"):
        write_report(out, tmp_path / "report", plots=False, alternative="less")


# --- labels ---------------------------------------------------------------------------------------------------

RAW = "bn_gamma1+gamma_init=0.269+gamma_lr_div=1"
LABELS = {"base": "BASE", RAW: "BN γ0=0.269", "worse": "worse_one"}


def test_labels_replace_method_strings_in_every_table_and_the_csv_keeps_both(tmp_path):
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, (RAW, 0.1): POWER_NEW,
                                            ("worse", 0.1): POWER_WORSE}, [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False, labels=LABELS)
    md = (tmp_path / "report" / "report.md").read_text()
    table = [line for line in md.split("### Power")[0].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| BASE (baseline)", "| BN γ0=0.269", "| worse_one"]
    assert "| BN γ0=0.269 | 0.1 | +0.80 [" in md  # the power section too
    assert RAW not in "\n".join(line for line in md.splitlines() if line.startswith("|"))
    assert f"BN γ0=0.269 = `{RAW}`" in md  # the note says which method each label stands for
    with open(tmp_path / "report" / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["label"]) for row in rows] == [("base", "BASE"), (RAW, "BN γ0=0.269"),
                                                               ("worse", "worse_one")]
    tex = (tmp_path / "report" / "report_fake.tex").read_text()
    assert "BN γ0=0.269 &" in tex and r"worse\_one &" in tex and "gamma" not in tex


def test_labels_from_a_file_and_refused_labels(tmp_path):
    from timm_bninit.experiment.cli import compare_main
    from timm_bninit.experiment.report import ReportInputError, check_labels, read_labels

    path = tmp_path / "labels.yaml"
    path.write_text(f"base: BASE\n{RAW}: BN γ0=0.269\n")
    assert read_labels(path) == {"base": "BASE", RAW: "BN γ0=0.269"}
    with pytest.raises(ReportInputError, match="not in the sweep: nope; its methods are base, better"):
        check_labels({"nope": "x"}, ["base", "better"])
    with pytest.raises(ReportInputError, match="'base' and 'better' have the same label 'B'"):
        check_labels({"base": "B", "better": "B"}, ["base", "better"])
    with pytest.raises(ReportInputError, match="must map method strings to non-empty label strings"):
        check_labels(["base"], None)
    with pytest.raises(ReportInputError, match="does not exist"):
        read_labels(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ReportInputError, match="is not YAML"):
        read_labels(tmp_path / "bad.yaml")
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW}, [1, 2, 3, 4, 5])
    assert compare_main(["report", str(out), "--no-plots", "--labels", str(path)]) == 2  # RAW is not in this sweep
    path.write_text("base: BASE\nbetter: γ-init\n")
    assert compare_main(["report", str(out), "--no-plots", "--labels", str(path), "--alternative", "two-sided"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "| γ-init | " in md and "| CI excludes 0 |" in md


# --- what the runs did: learning curves, convergence, γ change -------------------------------------------------

SHORT, LONG = "base+epochs=4", "base+epochs=8"
CURVE_SEEDS = [1, 2, 3]


def _val_acc(method: str, seed: int) -> list[float]:
    """Validation accuracy per epoch: rising, with seed 2 peaking early, and seed 3 of the long budget tied at the
    top over its last two epochs (training keeps the first of them)."""
    epochs = 4 if method == SHORT else 8
    curve = [60.0 + 20.0 * (1 - 0.6 ** e) + 0.5 * seed for e in range(1, epochs + 1)]
    if seed == 2:
        curve[-1] = curve[-2] - 1.0
    if seed == 3 and method == LONG:
        curve[-1] = curve[-2]
    return curve


def _val_loss(method: str, seed: int) -> list[float]:
    epochs = 4 if method == SHORT else 8
    return [0.2 + 1.5 * 0.7 ** e + 0.01 * seed for e in range(1, epochs + 1)]


def _curve_sweep(out: Path, gamma: bool = True, losses: bool = True) -> Path:
    entries = []
    for method in (SHORT, LONG):
        for seed in CURVE_SEEDS:
            run_dir = layout.sweep_run_dir(out, method, 0.1, seed)
            run_dir.mkdir(parents=True)
            acc, loss = _val_acc(method, seed), _val_loss(method, seed)
            for epoch, (accuracy, value) in enumerate(zip(acc, loss), start=1):
                layout.append_metrics(run_dir, {"epoch": epoch, "val_acc": accuracy, "test_acc": accuracy - 2.0,
                                                **({"val_loss": value, "test_loss": value + 0.1} if losses else {})})
            final = {"test_acc_at_best_val": max(acc) - 2.0, "test_acc_last": acc[-1] - 2.0}
            if gamma:
                final["gamma_change"] = {"mean": 0.01 * seed * (2 if method == LONG else 1), "max": 0.1 * seed,
                                         "initial_mean": 1.0, "channels": 10, "layers": 2}
            layout.write_final(run_dir, final)
            entries.append({"method": method, "lr": 0.1, "seed": seed, "dataset": "fake",
                            "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, entries)
    return out


def _pm(values, digits: int, signed: bool = False) -> str:
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    return (f"{mean:+.{digits}f}".replace("-", "−") if signed else f"{mean:.{digits}f}") + f" ± {sd:.{digits}f}"


def test_a_budget_pilot_reads_as_one_convergence_row_per_budget(tmp_path):
    out = _curve_sweep(tmp_path / "sweep")
    labels = {SHORT: "BASE, 4 epochs", LONG: "BASE, 8 epochs"}
    written = write_report(out, tmp_path / "report", plots=False, baseline=SHORT, labels=labels)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("### Learning curves (fake)"):]
    for method, epochs, back in ((SHORT, 4, 1), (LONG, 8, 2)):
        acc = np.array([_val_acc(method, s) for s in CURVE_SEEDS])
        loss = np.array([_val_loss(method, s) for s in CURVE_SEEDS])
        span = f"({epochs - back}→{epochs})"
        best_last = sum(int(np.argmax(a)) == epochs - 1 for a in acc)  # first maximum, as training selects
        expected = (f"| {labels[method]} | 0.1 | 3 | {epochs} | {_pm(acc[:, -1], 2)} | "
                    f"{_pm(acc[:, -1] - acc[:, -1 - back], 2, True)} {span} | {_pm(loss[:, -1], 3)} | "
                    f"{_pm(loss[:, -1] - loss[:, -1 - back], 3, True)} {span} | {best_last} of 3 |")
        assert expected in section.splitlines(), expected
    assert "| BASE, 4 epochs | 0.1 | 3 | 4 |" in section and "2 of 3 |" in section  # seed 2 peaked at epoch 3
    assert "| BASE, 8 epochs | 0.1 | 3 | 8 |" in section and "1 of 3 |" in section  # ... and seed 3 tied at 7 and 8
    # per epoch: mean ± sd over seeds, in the collapsed table and the CSV
    row = next(line for line in section.splitlines() if line.startswith("| BASE, 8 epochs | 0.1 | 5 |"))
    acc5 = [_val_acc(LONG, s)[4] for s in CURVE_SEEDS]
    loss5 = [_val_loss(LONG, s)[4] for s in CURVE_SEEDS]
    assert row == f"| BASE, 8 epochs | 0.1 | 5 | {_pm(acc5, 2)} | {_pm(loss5, 3)} | {_pm(np.subtract(acc5, 2.0), 2)} |"
    assert tmp_path / "report" / "learning_curves.csv" in written
    with open(tmp_path / "report" / "learning_curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 + 8 and {row["method"] for row in rows} == {SHORT, LONG}
    five = next(row for row in rows if row["method"] == LONG and row["epoch"] == "5")
    assert five["label"] == "BASE, 8 epochs" and five["n"] == "3"
    assert float(five["val_acc_mean"]) == pytest.approx(np.mean(acc5), abs=1e-6)
    assert float(five["val_acc_sd"]) == pytest.approx(np.std(acc5, ddof=1), abs=1e-6)


def test_did_gamma_move_section(tmp_path):
    out = _curve_sweep(tmp_path / "sweep")
    write_report(out, tmp_path / "report", plots=False, baseline=SHORT)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("### Did γ move? (fake)"):md.index("### Learning curves")]
    for method, factor in ((SHORT, 1), (LONG, 2)):
        means = [0.01 * s * factor for s in CURVE_SEEDS]
        assert (f"| {method} | 0.1 | 3 | {np.mean(means):.3g} ± {np.std(means, ddof=1):.3g} | 0.3 | 1 |"
                in section.splitlines())
    assert "the input BN included" in section


def test_the_new_sections_appear_only_for_runs_that_recorded_them(tmp_path):
    old = _curve_sweep(tmp_path / "old", gamma=False, losses=False)  # a sweep run before losses and γ were recorded
    write_report(old, tmp_path / "auto", plots=False, baseline=SHORT)
    md = (tmp_path / "auto" / "report.md").read_text()
    assert "### Learning curves" not in md and "### Did γ move?" not in md
    assert not (tmp_path / "auto" / "learning_curves.csv").exists()
    write_report(old, tmp_path / "forced", plots=False, baseline=SHORT, curves=True)
    forced = (tmp_path / "forced" / "report.md").read_text()
    row = next(line for line in forced.splitlines() if line.startswith(f"| {SHORT} | 0.1 | 3 | 4 |"))
    assert row.split(" | ")[6:8] == ["n/a", "n/a"]  # accuracies from the old runs, no loss
    new = _curve_sweep(tmp_path / "new")
    write_report(new, tmp_path / "off", plots=False, baseline=SHORT, curves=False)
    off = (tmp_path / "off" / "report.md").read_text()
    assert "### Learning curves" not in off and "### Did γ move?" in off


def test_diverged_runs_are_counted_listed_and_enter_the_test_at_chance_level(tmp_path):
    # what a run writes when it diverges (train.py): status, where, and chance level, 100/k, in every accuracy
    chance = 100.0 / 3
    base, new = [70.0, 72.0, 71.0, 69.0], [74.0, chance, 73.5, chance]  # seeds 2 and 4 of "new" diverged
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): base, ("new", 0.1): new}, [1, 2, 3, 4])
    for seed in (2, 4):
        run_dir = layout.sweep_run_dir(out, "new", 0.1, seed)
        layout.write_final(run_dir, {"test_acc_at_best_val": chance, "test_acc_last": chance, "status": "diverged",
                                     "divergence": {"epoch": 3, "step": 5, "loss": "nan", "chance_acc": chance}})
        assert layout.run_status(run_dir) == "diverged"
    assert layout.run_status(layout.sweep_run_dir(out, "new", 0.1, 1)) == "finished"
    write_report(out, tmp_path / "report", plots=False)
    md = (tmp_path / "report" / "report.md").read_text()
    expected = stats.ttest_rel(new, base, alternative="greater")
    row = next(line for line in md.splitlines() if line.startswith("| new |"))
    assert f"{np.mean(new):.2f} ± {np.std(new, ddof=1):.2f} (4; 2 diverged)" in row
    assert f"| {expected.pvalue:.3g} |" in row
    assert "(4)" in next(line for line in md.splitlines() if line.startswith("| base (baseline) |"))
    assert "Diverged runs (a non-finite training loss stopped them): new at lr 0.1: 2 of 4 (seeds 2, 4)" in md
    assert "at chance level, 100/k % for k classes (33.33% here), at every endpoint" in md
    with open(tmp_path / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert (rows["new"]["diverged"], rows["new"]["diverged_seeds"]) == ("2", "2 4")
    assert (rows["base"]["diverged"], rows["base"]["diverged_seeds"]) == ("0", "")
    assert float(rows["new"]["p"]) == pytest.approx(expected.pvalue, rel=1e-5)
    assert "(2 div.)" in (tmp_path / "report" / "report_fake.tex").read_text()


def test_a_sweep_without_diverged_runs_has_no_note(tmp_path):
    out = _power_sweep(tmp_path / "sweep", {("base", 0.1): POWER_BASE, ("better", 0.1): POWER_NEW}, [1, 2, 3, 4, 5])
    write_report(out, tmp_path / "report", plots=False)
    assert "iverged" not in (tmp_path / "report" / "report.md").read_text()
    assert "iverged" not in (tmp_path / "report" / "report.csv").read_text()  # the columns come with a diverged run
