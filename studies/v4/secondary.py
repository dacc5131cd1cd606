"""Study v4's secondary endpoints (PREREGISTRATION §1: reported, not read for the claims), from the finished runs of
``python scripts/study.py studies/v4``: test accuracy at the best-validation epoch and the last epoch's test loss, each
method against BASE with the primary endpoint's test (two-sided paired t, pairs matched by seed, Holm over the five
methods, 95% paired-t interval). Writes ``scratch/secondary.md`` beside this file and prints it.

    python studies/v4/secondary.py [RUNS_DIR]     # default runs/studies/v4/scratch
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

from timm_bninit.experiment.power import paired_difference
from timm_bninit.experiment.report import holm

HERE = Path(__file__).resolve().parent
# title -> (run value, decimals shown)
ENDPOINTS = {"test accuracy at the best-validation epoch (%)": ("best_val_test_acc", 2),
             "test loss at the last epoch (cross-entropy)": ("last_test_loss", 4)}


def run_values(run_dir: Path) -> dict[str, float]:
    """Both secondary endpoints of one finished run, from its final.json and metrics.jsonl."""
    final = json.loads((run_dir / "final.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(epochs, key=lambda record: record["epoch"])
    assert last["epoch"] == final["epochs"], f"{run_dir}: metrics.jsonl ends at epoch {last['epoch']}"
    return {"best_val_test_acc": final["test_acc_at_best_val"], "last_test_loss": last["test_loss"]}


def main() -> None:
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/studies/v4/scratch")
    part = yaml.safe_load((HERE / "protocol.yaml").read_text())["parts"]["scratch"]
    seeds = list(range(301, 316))
    values = {}
    for method in part["methods"]:
        folder = runs / method.replace("+", "__") / "lr0.1"
        values[method] = [run_values(folder / f"seed{seed}") for seed in seeds]
    lines = ["# Study v4: secondary endpoints", "",
             "Not read for the claims (PREREGISTRATION §1). Method − BASE per seed, two-sided paired t-test, Holm over "
             "the five methods, 95% paired-t interval; mean ± sample sd over the 15 seeds 301–315. "
             "`python studies/v4/secondary.py`", ""]
    for title, (key, digits) in ENDPOINTS.items():
        base = np.array([v[key] for v in values["base"]])
        others = [m for m in part["methods"] if m != "base"]
        rows, p_values = [], []
        for method in others:
            new = np.array([v[key] for v in values[method]])
            diff = paired_difference(new, base, confidence=0.95, alternative="two-sided")
            p_values.append(diff.p)
            rows.append((method, new, diff.mean_diff, diff.ci_low, diff.ci_high))
        lines += [f"## {title}", "", "| method | mean ± sd | method − BASE [95% CI] | p | p (Holm) |",
                  "|---|---|---|---|---|",
                  f"| {part['labels']['base']} | {base.mean():.{digits}f} ± {base.std(ddof=1):.{digits}f} "
                  "| — | — | — |"]
        for (method, new, mean, low, high), p, adjusted in zip(rows, p_values, holm(p_values)):
            lines.append(f"| {part['labels'][method]} | {new.mean():.{digits}f} ± {new.std(ddof=1):.{digits}f} | "
                         f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] | {p:.3g} | {adjusted:.3g} |")
        lines.append("")
    text = "\n".join(lines)
    (HERE / "scratch" / "secondary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
