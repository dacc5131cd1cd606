"""The report's power section and CSV columns (issue 10, point 3), on sweep folders written through the layout
module, checked against numbers written out here and scipy's t and noncentral t evaluated by hand."""

import csv
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
