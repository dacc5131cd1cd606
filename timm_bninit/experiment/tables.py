"""The tables of a sweep report: one cell per method and learning rate, and how a p-value is printed.

:mod:`.report` fills them (means, paired t-tests, power) and writes them as text; :mod:`.plots` draws the same cells,
so the picture and the table can never disagree. Neither imports the other for them. A table also carries the
readable labels of its methods (``labels``: method → label), which every table and plot shows in place of the method
string; the method string stays the key of everything, and the CSV keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .power import PowerSummary

__all__ = ["ALPHA", "Cell", "SweepTable", "format_p", "ci_verdict"]

ALPHA = 0.05  # a paired t-test is significant at p ≤ ALPHA (docs/methods.md §6)


@dataclass
class Cell:
    method: str
    lr: float
    seeds: list[int]
    values: list[float]
    p: float | None = None          # paired t-test against the baseline, the table's alternative (None: baseline)
    p_holm: float | None = None
    t: float | None = None
    power: PowerSummary | None = None   # difference to the baseline and the design's power (None: baseline, n < 2)
    diverged: list[int] = field(default_factory=list)   # seeds whose run diverged: in ``values`` at chance level

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
    alternative: str = "greater"    # scipy's alternative of every test of the table: "greater" or "two-sided"
    labels: dict[str, str] = field(default_factory=dict)  # method -> readable label; a method without one shows as is

    def label(self, method: str) -> str:
        """What tables and plots call ``method``: its label, else the method string itself."""
        return self.labels.get(method, method)


def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    if math.isnan(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def ci_verdict(summary: PowerSummary | None) -> str:
    """Whether a difference's 95% CI excludes 0, and on which side: the direction a two-sided reading may claim."""
    if summary is None or math.isnan(summary.ci_low) or math.isnan(summary.ci_high):
        return "n/a"
    if summary.ci_low > 0:
        return "yes: above 0"
    if summary.ci_high < 0:
        return "yes: below 0"
    return "no"
