"""Power of a paired-seed comparison: what a design with n paired seeds can detect, and how many seeds it needs.

The test is the project's (docs/methods.md §6): one-sided paired t-test of ``new`` against ``base``,
``scipy.stats.ttest_rel(new, base, alternative='greater')``, significant at p ≤ α. On the per-seed differences
d_i = new_i − base_i (mean δ̂, sample std s, n pairs) the statistic is T = δ̂·√n / s with n − 1 degrees of freedom.
If the true mean difference is δ and the differences are normal with std σ, T follows a noncentral t with
df = n − 1 and noncentrality λ = δ·√n / σ, so the power of the test is

    power(δ) = P(T' > t_{1−α, n−1}),   T' ~ nct(df=n − 1, nc=δ·√n / σ).

``minimum_detectable_effect`` solves power(δ) = target for δ; ``seeds_needed`` finds the smallest n whose power
reaches the target. Both take σ as known (plugged in from the observed ``sd_diff``), the usual planning convention:
the answer is as good as the pilot's estimate of σ.

The module is pure (numbers in, numbers out): the sweep reader and the report call it, it reads no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from ..errors import BNInitError

__all__ = ["PowerInputError", "PairedDifference", "PowerSummary", "paired_difference", "paired_t_power",
           "minimum_detectable_effect", "seeds_needed", "power_summary"]


class PowerInputError(BNInitError, ValueError):
    """Input a power computation cannot use (too few pairs, unequal lengths, zero spread, out-of-range levels)."""


@dataclass(frozen=True)
class PairedDifference:
    """The per-seed differences ``new − base`` summarised.

    Attributes:
        mean_diff: mean of the differences (percentage points when the values are accuracies in %).
        sd_diff: sample standard deviation of the differences (ddof=1).
        n: number of pairs.
        ci_low: lower end of the two-sided confidence interval of the mean difference (paired t).
        ci_high: upper end of that interval.
        t: the paired t statistic, as scipy reports it.
        p: one-sided p-value of ``ttest_rel(new, base, alternative='greater')``.
    """

    mean_diff: float
    sd_diff: float
    n: int
    ci_low: float
    ci_high: float
    t: float
    p: float


@dataclass(frozen=True)
class PowerSummary:
    """One method against the baseline: the difference, its interval, and the power of the design.

    Attributes:
        mean_diff: mean per-seed difference, method − baseline.
        ci_low: lower end of the two-sided 95% paired-t interval of ``mean_diff``.
        ci_high: upper end of that interval.
        sd_diff: sample std of the per-seed differences.
        n: number of paired seeds.
        p: one-sided paired t-test p (``ttest_rel(method, base, alternative='greater')``).
        mde: smallest true mean difference this design (n seeds, ``sd_diff``) detects with probability ``power``;
            NaN when ``sd_diff`` is 0 (the differences have no spread, so there is no noise to plan against).
        n_needed_for_observed: seeds that would detect a true difference equal to ``mean_diff`` with probability
            ``power``; None when ``mean_diff`` ≤ 0 (a one-sided test for improvement never reaches that power on a
            non-positive effect), when ``sd_diff`` is 0, or when more than ``max_n`` seeds would be needed.
        alpha: level of the one-sided test.
        power: target power.
        max_n: the largest n ``n_needed_for_observed`` was searched up to.
    """

    mean_diff: float
    ci_low: float
    ci_high: float
    sd_diff: float
    n: int
    p: float
    mde: float
    n_needed_for_observed: int | None
    alpha: float = 0.05
    power: float = 0.8
    max_n: int = 10_000


def _check_levels(alpha: float, power: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise PowerInputError(f"alpha must be in (0, 1), got {alpha!r}; the project's test uses 0.05")
    # Power ≤ α is reached by a zero effect already, so the question "which effect reaches it" has no positive answer.
    if not alpha < power < 1.0:
        raise PowerInputError(f"power must be in (alpha={alpha:g}, 1), got {power!r}; the usual target is 0.8")


def _check_sd(sd_diff: float) -> None:
    if not (math.isfinite(sd_diff) and sd_diff > 0):
        raise PowerInputError(f"sd of the paired differences must be a positive finite number, got {sd_diff!r}; with "
                              "zero spread there is no noise to plan against (are the two methods identical?)")


def _check_n(n: int, what: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise PowerInputError(f"{what} must be an integer ≥ 2 (a paired t-test needs two pairs), got {n!r}")


def paired_difference(new: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Summarise paired per-seed values: mean and sd of ``new − base``, its paired-t interval, the one-sided p.

    The interval is two-sided at ``confidence`` (mean ± t_{(1+confidence)/2, n−1}·s/√n), the usual way to show
    an effect's size; the test is one-sided at the caller's α. At 95% the interval's lower end is the one-sided
    97.5% bound, so an interval touching 0 can sit beside p slightly below 0.05.

    Args:
        new: the method's values, one per seed.
        base: the baseline's values for the same seeds, in the same order.
        confidence: coverage of the two-sided interval.

    Returns:
        The summary; ``p`` equals ``scipy.stats.ttest_rel(new, base, alternative='greater').pvalue``.

    Raises:
        PowerInputError: unequal lengths, fewer than two pairs, non-finite values, or confidence outside (0, 1).
    """
    try:
        new_values = np.asarray(new, dtype=float)
        base_values = np.asarray(base, dtype=float)
    except (TypeError, ValueError) as error:
        raise PowerInputError(f"paired values must be numbers: {error}") from None
    if new_values.ndim != 1 or new_values.shape != base_values.shape:
        raise PowerInputError(f"paired values need one value per seed on each side, got {new_values.shape} and "
                              f"{base_values.shape}; pair the runs by seed first")
    _check_n(len(new_values), "number of pairs")
    if not (np.isfinite(new_values).all() and np.isfinite(base_values).all()):
        raise PowerInputError("paired values must be finite (a NaN or inf is a failed run, not a result)")
    if not 0.0 < confidence < 1.0:
        raise PowerInputError(f"confidence must be in (0, 1), got {confidence!r}")
    diff = new_values - base_values
    n = len(diff)
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    # scipy's own test, not a re-derivation: the report's p must be the one the paper's code prints.
    result = stats.ttest_rel(new_values, base_values, alternative="greater")
    return PairedDifference(mean, sd, n, mean - half, mean + half, float(result.statistic), float(result.pvalue))


def paired_t_power(effect: float, sd_diff: float, n: int, alpha: float = 0.05) -> float:
    """Power of the one-sided paired t-test at level ``alpha`` with ``n`` pairs against a true mean difference.

    Args:
        effect: true mean difference δ (same unit as ``sd_diff``); δ = 0 gives α, δ < 0 less.
        sd_diff: standard deviation σ of the per-seed differences.
        n: number of pairs.
        alpha: level of the one-sided test.

    Returns:
        P(T' > t_{1−α, n−1}) with T' ~ nct(n − 1, δ·√n/σ).
    """
    _check_sd(sd_diff)
    _check_n(n)
    if not 0.0 < alpha < 1.0:
        raise PowerInputError(f"alpha must be in (0, 1), got {alpha!r}")
    if not math.isfinite(effect):
        raise PowerInputError(f"effect must be a finite number, got {effect!r}")
    df = n - 1
    return float(stats.nct.sf(stats.t.ppf(1 - alpha, df), df, effect * math.sqrt(n) / sd_diff))


def minimum_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference that the one-sided paired t-test at ``alpha`` detects with ``power``.

    Solved on the noncentrality λ (which depends on n, α and power only) with ``scipy.optimize.brentq``, then
    δ = λ·σ/√n.

    Args:
        sd_diff: standard deviation σ of the per-seed differences (from a pilot or the sweep itself).
        n: number of pairs of the design.
        alpha: level of the one-sided test.
        power: target probability of p ≤ α.

    Returns:
        δ in the unit of ``sd_diff`` (percentage points for accuracies in %).

    Raises:
        PowerInputError: n < 2, σ ≤ 0, or α / power outside 0 < α < power < 1.
    """
    _check_sd(sd_diff)
    _check_n(n)
    _check_levels(alpha, power)
    df = n - 1
    critical = stats.t.ppf(1 - alpha, df)

    def shortfall(nc: float) -> float:
        return float(stats.nct.sf(critical, df, nc)) - power

    # shortfall(0) = α − power < 0; the normal approximation's λ is a start, doubled until the root is bracketed
    # (df = 1 has heavy tails and needs a λ well above it).
    high = float(critical + stats.norm.ppf(power)) + 1.0
    while shortfall(high) <= 0:
        high *= 2
    nc = optimize.brentq(shortfall, 0.0, high, xtol=1e-12)
    return nc * sd_diff / math.sqrt(n)


def seeds_needed(effect: float, sd_diff: float, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = 10_000) -> int | None:
    """Smallest number of paired seeds n ≥ 2 at which the one-sided paired t-test detects ``effect`` with ``power``.

    Args:
        effect: the true mean difference to detect (unit of ``sd_diff``).
        sd_diff: standard deviation σ of the per-seed differences.
        alpha: level of the one-sided test.
        power: target probability of p ≤ α.
        max_n: largest n searched.

    Returns:
        The smallest such n, or None when no n reaches the target: always for ``effect`` ≤ 0 (a test for
        improvement then rejects with probability ≤ α < power at every n), and when even ``max_n`` seeds fall short.
        A caller tells the two apart by the sign of ``effect``.

    Raises:
        PowerInputError: σ ≤ 0, non-finite effect, max_n < 2, or α / power outside 0 < α < power < 1.
    """
    _check_sd(sd_diff)
    _check_levels(alpha, power)
    _check_n(max_n, "max_n")
    if not math.isfinite(effect):
        raise PowerInputError(f"effect must be a finite number, got {effect!r}")
    if effect <= 0:
        return None
    if paired_t_power(effect, sd_diff, max_n, alpha) < power:
        return None
    # Power rises with n for a positive effect (the critical value falls and λ = δ√n/σ grows), so bisect on n:
    # low always falls short, high always reaches the target.
    low, high = 1, max_n
    while high - low > 1:
        middle = (low + high) // 2
        if paired_t_power(effect, sd_diff, middle, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def power_summary(new: Sequence[float], base: Sequence[float], alpha: float = 0.05, power: float = 0.8,
                  max_n: int = 10_000) -> PowerSummary:
    """The report's power line for one method against the baseline, from the paired per-seed values.

    Args:
        new: the method's values, one per seed.
        base: the baseline's values for the same seeds, in the same order.
        alpha: level of the one-sided test.
        power: target power for the minimum detectable effect and the seeds needed.
        max_n: largest number of seeds searched for ``n_needed_for_observed``.

    Returns:
        The summary; see :class:`PowerSummary` for when ``mde`` is NaN and ``n_needed_for_observed`` is None.

    Raises:
        PowerInputError: as :func:`paired_difference`, or α / power outside 0 < α < power < 1.
    """
    _check_levels(alpha, power)
    diff = paired_difference(new, base, confidence=0.95)
    # Zero spread is a legitimate outcome in a report (a method identical to the baseline gives identical runs);
    # planning has no σ then, so the power columns say "undefined" instead of failing the whole report.
    if diff.sd_diff > 0:
        mde = minimum_detectable_effect(diff.sd_diff, diff.n, alpha, power)
        needed = seeds_needed(diff.mean_diff, diff.sd_diff, alpha, power, max_n)
    else:
        mde, needed = float("nan"), None
    return PowerSummary(diff.mean_diff, diff.ci_low, diff.ci_high, diff.sd_diff, diff.n, diff.p, mde, needed,
                        alpha, power, max_n)
