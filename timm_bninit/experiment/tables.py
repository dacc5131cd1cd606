"""The tables of a sweep report: one cell per method and learning rate, and how a p-value is printed.

:mod:`.report` fills them (means, paired t-tests, power) and writes them as text; :mod:`.plots` draws the same cells,
so the picture and the table can never disagree. Neither imports the other for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .power import PowerSummary

__all__ = ["ALPHA", "Cell", "SweepTable", "format_p"]

ALPHA = 0.05  # a one-sided paired t-test is significant at p ≤ ALPHA (docs/methods.md §6)


@dataclass
class Cell:
    method: str
    lr: float
    seeds: list[int]
    values: list[float]
    p: float | None = None          # one-sided paired t-test against the baseline (None for the baseline)
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


def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    if math.isnan(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"
