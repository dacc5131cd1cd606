"""The studies' published numbers are exactly what their command produced: the tables each study's page
(studies/vN/README.md) shows are the committed reports, and every statistic in them is re-derived here from the
committed run summaries with scipy."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from timm_bninit.experiment.report import holm

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
# (study folder, part): every part of every study, each shown verbatim on its study's page (v2 and v4 ran part 1 only)
ALL_PARTS = [("v1", "scratch"), ("v1", "finetune"), ("v2", "scratch"), ("v3", "scratch"), ("v3", "finetune"),
             ("v4", "scratch")]
# the run summary's value behind each report metric: v1-v3 read the best-validation epoch, v4 the last epoch
SUMMARY_KEYS = {"best_val": "test_acc_at_best_val", "last": "test_acc_last"}


def _table(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


@pytest.mark.parametrize(("study", "part"), ALL_PARTS)
def test_the_study_page_shows_the_committed_report(study, part):
    table = _table((STUDIES / study / part / "report.md").read_text().split("### Power")[0])
    page = (STUDIES / study / "README.md").read_text()
    assert table and table in page, f"studies/{study}/README.md's {part} table differs from studies/{study}/{part}"


@pytest.mark.parametrize(("study", "part"), ALL_PARTS)
def test_report_statistics_rederived_from_summaries(study, part):
    summaries = json.loads((STUDIES / study / part / "summaries.json").read_text())
    assert len({r["seed"] for r in summaries}) == 15
    with open(STUDIES / study / part / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    (metric,) = {row["metric"] for row in rows.values()}
    # a report states its test's sidedness in a column only when it is not the default one-sided test
    (alternative,) = {row.get("alternative") or "greater" for row in rows.values() if row["method"] != "base"}
    values: dict[str, dict[int, float]] = {}
    for run in summaries:
        values.setdefault(run["method"], {})[run["seed"]] = run[SUMMARY_KEYS[metric]]
    assert set(rows) == set(values)
    seeds = sorted(values["base"])
    base = [values["base"][s] for s in seeds]
    others = [m for m in values if m != "base"]
    p_values = []
    for method in values:
        assert sorted(values[method]) == seeds  # complete, paired seed sets
        new = [values[method][s] for s in seeds]
        row = rows[method]
        assert int(row["n"]) == 15
        assert float(row["mean"]) == pytest.approx(np.mean(new), abs=1e-6)
        assert float(row["std"]) == pytest.approx(np.std(new, ddof=1), abs=1e-6)
    for method in others:
        new = [values[method][s] for s in seeds]
        p = float(stats.ttest_rel(new, base, alternative=alternative).pvalue)
        p_values.append(p)
        if alternative == "two-sided":  # the 95% interval of the mean paired difference: mean ± t(0.975, n-1)·sd/√n
            diffs = np.subtract(new, base)
            half = stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs))
            assert float(rows[method]["mean_diff"]) == pytest.approx(diffs.mean(), abs=1e-6)
            assert float(rows[method]["ci_low"]) == pytest.approx(diffs.mean() - half, abs=1e-6)
            assert float(rows[method]["ci_high"]) == pytest.approx(diffs.mean() + half, abs=1e-6)
        if math.isnan(p):
            assert rows[method]["p"] == "nan"
        else:
            assert float(rows[method]["p"]) == pytest.approx(p, rel=1e-5)
    for method, adjusted in zip(others, holm(p_values)):
        if not math.isnan(adjusted):
            assert float(rows[method]["p_holm"]) == pytest.approx(adjusted, rel=1e-5)
            assert (rows[method]["significant"] == "True") == (adjusted <= 0.05)


def test_v4_secondary_best_validation_rows_rederived_from_summaries():
    """studies/v4/scratch/secondary.md's first table (test accuracy at the best-validation epoch, the one of its two
    secondary endpoints the committed summaries hold) is what scipy gives on summaries.json, to the digits shown."""
    summaries = json.loads((STUDIES / "v4" / "scratch" / "summaries.json").read_text())
    labels = yaml.safe_load((STUDIES / "v4" / "protocol.yaml").read_text())["parts"]["scratch"]["labels"]
    values: dict[str, dict[int, float]] = {}
    for run in summaries:
        values.setdefault(run["method"], {})[run["seed"]] = run["test_acc_at_best_val"]
    section = (STUDIES / "v4" / "scratch" / "secondary.md").read_text().split("## ")[1]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| "))}
    seeds = sorted(values["base"])
    base = np.array([values["base"][s] for s in seeds])
    others = [m for m in values if m != "base"]
    p_values = []
    for method in others:
        new = np.array([values[method][s] for s in seeds])
        diffs = new - base
        half = stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs))
        p_values.append(float(stats.ttest_rel(new, base).pvalue))
        row = rows[labels[method]]
        assert row[0] == f"{new.mean():.2f} ± {new.std(ddof=1):.2f}"
        assert row[1] == f"{diffs.mean():+.2f} [{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}]"
        assert row[2] == f"{p_values[-1]:.3g}"
    for method, adjusted in zip(others, holm(p_values)):
        assert rows[labels[method]][3] == f"{adjusted:.3g}"
    assert rows[labels["base"]][0] == f"{base.mean():.2f} ± {base.std(ddof=1):.2f}"
