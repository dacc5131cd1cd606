"""The studies' published numbers are exactly what their command produced: the tables each study's page
(studies/vN/README.md) shows are the committed reports, and every statistic in them is re-derived here from the
committed run summaries with scipy."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from timm_bninit.experiment.report import holm

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
# (study folder, part): every part of every study, each shown verbatim on its study's page (v2 ran part 1 only)
ALL_PARTS = [("v1", "scratch"), ("v1", "finetune"), ("v2", "scratch"), ("v3", "scratch"), ("v3", "finetune")]


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
    values: dict[str, dict[int, float]] = {}
    for run in summaries:
        values.setdefault(run["method"], {})[run["seed"]] = run["test_acc_at_best_val"]
    with open(STUDIES / study / part / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
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
        p = float(stats.ttest_rel(new, base, alternative="greater").pvalue)
        p_values.append(p)
        if math.isnan(p):
            assert rows[method]["p"] == "nan"
        else:
            assert float(rows[method]["p"]) == pytest.approx(p, rel=1e-5)
    for method, adjusted in zip(others, holm(p_values)):
        if not math.isnan(adjusted):
            assert float(rows[method]["p_holm"]) == pytest.approx(adjusted, rel=1e-5)
            assert (rows[method]["significant"] == "True") == (adjusted <= 0.05)
