"""Power of a paired-seed comparison: what a design with n paired seeds can detect, and how many seeds it needs.

The test is the project's (docs/methods.md §6): by default the one-sided paired t-test of ``new`` against ``base``,
``scipy.stats.ttest_rel(new, base, alternative='greater')``, significant at p ≤ α; ``alternative='two-sided'`` asks
whether the methods differ in either direction. On the per-seed differences d_i = new_i − base_i (mean δ̂, sample
std s, n pairs) the statistic is T = δ̂·√n / s with n − 1 degrees of freedom. If the true mean difference is δ and
the differences are normal with std σ, T follows a noncentral t with df = n − 1 and noncentrality λ = δ·√n / σ, so
the power of the test is

    one-sided:  power(δ) = P(T' > t_{1−α, n−1}),
    two-sided:  power(δ) = P(T' > t_{1−α/2, n−1}) + P(T' < −t_{1−α/2, n−1}),   T' ~ nct(df=n − 1, nc=δ·√n / σ).

The two-sided power is even in δ and rises with |δ|, so its minimum detectable effect is a size |δ|, and both tails
count (a test that rejects in the wrong direction also rejects; at the effects of interest that tail is tiny).
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

__all__ = ["ALTERNATIVES", "PowerInputError", "PairedDifference", "PowerSummary", "paired_difference", "paired_t_power",
           "minimum_detectable_effect", "seeds_needed", "power_summary"]


ALTERNATIVES = ("greater", "two-sided")  # scipy's names: the method better than the baseline, or different from it


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
        p: p-value of ``ttest_rel(new, base, alternative=alternative)``.
        alternative: ``greater`` (one-sided, the default) or ``two-sided``.
    """

    mean_diff: float
    sd_diff: float
    n: int
    ci_low: float
    ci_high: float
    t: float
    p: float
    alternative: str = "greater"


@dataclass(frozen=True)
class PowerSummary:
    """One method against the baseline: the difference, its interval, and the power of the design.

    Attributes:
        mean_diff: mean per-seed difference, method − baseline.
        ci_low: lower end of the two-sided 95% paired-t interval of ``mean_diff``.
        ci_high: upper end of that interval.
        sd_diff: sample std of the per-seed differences.
        n: number of paired seeds.
        p: paired t-test p (``ttest_rel(method, base, alternative=alternative)``).
        mde: smallest true mean difference (two-sided: size of the difference) this design (n seeds, ``sd_diff``)
            detects with probability ``power``; NaN when ``sd_diff`` is 0 (the differences have no spread, so there
            is no noise to plan against).
        n_needed_for_observed: seeds that would detect a true difference equal to ``mean_diff`` with probability
            ``power``; None when ``mean_diff`` ≤ 0 in the one-sided test (a test for improvement never reaches that
            power on a non-positive effect) or is 0 in the two-sided one, when ``sd_diff`` is 0, or when more than
            ``max_n`` seeds would be needed.
        alpha: level of the test.
        power: target power.
        max_n: the largest n ``n_needed_for_observed`` was searched up to.
        alternative: ``greater`` (one-sided, the default) or ``two-sided``.
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
    alternative: str = "greater"


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise PowerInputError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")


def _critical(alpha: float, df: int, alternative: str) -> float:
    """The t statistic's rejection bound: t_{1−α} one-sided, t_{1−α/2} two-sided (where |T| beyond it rejects)."""
    return float(stats.t.ppf(1 - alpha / 2 if alternative == "two-sided" else 1 - alpha, df))


def _power_at(nc: float, critical: float, df: int, alternative: str) -> float:
    """P(reject) for a noncentral t with noncentrality ``nc``: the upper tail, plus the lower one when two-sided."""
    upper = float(stats.nct.sf(critical, df, nc))
    if alternative != "two-sided":
        return upper
    # P(T' < −c) written as the upper tail of −T' ~ nct(df, −λ): scipy's cdf returns NaN for some large λ (n ≈ 5,000
    # at δ = σ/2), its sf of the mirrored variable returns the (vanishing) value
    return upper + float(stats.nct.sf(critical, df, -nc))


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


def paired_difference(new: Sequence[float], base: Sequence[float], confidence: float = 0.95,
                      alternative: str = "greater") -> PairedDifference:
    """Summarise paired per-seed values: mean and sd of ``new − base``, its paired-t interval, the test's p.

    The interval is two-sided at ``confidence`` (mean ± t_{(1+confidence)/2, n−1}·s/√n), the usual way to show
    an effect's size, whatever the test's alternative. At 95% the interval's lower end is the one-sided 97.5% bound, so
    an interval touching 0 can sit beside a one-sided p slightly below 0.05; the two-sided test at α = 0.05 rejects
    exactly when the 95% interval excludes 0.

    Args:
        new: the method's values, one per seed.
        base: the baseline's values for the same seeds, in the same order.
        confidence: coverage of the two-sided interval.
        alternative: ``greater`` (one-sided, the project's default) or ``two-sided``.

    Returns:
        The summary; ``p`` equals ``scipy.stats.ttest_rel(new, base, alternative=alternative).pvalue``.

    Raises:
        PowerInputError: unequal lengths, fewer than two pairs, non-finite values, confidence outside (0, 1), or an
            unknown alternative.
    """
    _check_alternative(alternative)
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
    result = stats.ttest_rel(new_values, base_values, alternative=alternative)
    return PairedDifference(mean, sd, n, mean - half, mean + half, float(result.statistic), float(result.pvalue),
                            alternative)


def paired_t_power(effect: float, sd_diff: float, n: int, alpha: float = 0.05, alternative: str = "greater") -> float:
    """Power of the paired t-test at level ``alpha`` with ``n`` pairs against a true mean difference.

    Args:
        effect: true mean difference δ (same unit as ``sd_diff``); one-sided, δ = 0 gives α and δ < 0 less;
            two-sided, δ = 0 gives α and ±δ the same power.
        sd_diff: standard deviation σ of the per-seed differences.
        n: number of pairs.
        alpha: level of the test.
        alternative: ``greater`` (one-sided) or ``two-sided``.

    Returns:
        P(T' > t_{1−α, n−1}) one-sided, P(|T'| > t_{1−α/2, n−1}) two-sided, with T' ~ nct(n − 1, δ·√n/σ).
    """
    _check_sd(sd_diff)
    _check_n(n)
    _check_alternative(alternative)
    if not 0.0 < alpha < 1.0:
        raise PowerInputError(f"alpha must be in (0, 1), got {alpha!r}")
    if not math.isfinite(effect):
        raise PowerInputError(f"effect must be a finite number, got {effect!r}")
    df = n - 1
    return _power_at(effect * math.sqrt(n) / sd_diff, _critical(alpha, df, alternative), df, alternative)


def minimum_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8,
                              alternative: str = "greater") -> float:
    """Smallest true mean difference (two-sided: its size) that the paired t-test at ``alpha`` detects with ``power``.

    Solved on the noncentrality λ (which depends on n, α, power and the alternative only) with
    ``scipy.optimize.brentq``, then δ = λ·σ/√n. Both powers rise with λ ≥ 0, so the root is unique.

    Args:
        sd_diff: standard deviation σ of the per-seed differences (from a pilot or the sweep itself).
        n: number of pairs of the design.
        alpha: level of the test.
        power: target probability of p ≤ α.
        alternative: ``greater`` (one-sided) or ``two-sided``.

    Returns:
        δ in the unit of ``sd_diff`` (percentage points for accuracies in %).

    Raises:
        PowerInputError: n < 2, σ ≤ 0, α / power outside 0 < α < power < 1, or an unknown alternative.
    """
    _check_sd(sd_diff)
    _check_n(n)
    _check_levels(alpha, power)
    _check_alternative(alternative)
    df = n - 1
    critical = _critical(alpha, df, alternative)

    def shortfall(nc: float) -> float:
        return _power_at(nc, critical, df, alternative) - power

    # shortfall(0) = α − power < 0; the normal approximation's λ is a start, doubled until the root is bracketed
    # (df = 1 has heavy tails and needs a λ well above it).
    high = float(critical + stats.norm.ppf(power)) + 1.0
    while shortfall(high) <= 0:
        high *= 2
    nc = optimize.brentq(shortfall, 0.0, high, xtol=1e-12)
    return nc * sd_diff / math.sqrt(n)


def seeds_needed(effect: float, sd_diff: float, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = 10_000, alternative: str = "greater") -> int | None:
    """Smallest number of paired seeds n ≥ 2 at which the paired t-test detects ``effect`` with ``power``.

    Args:
        effect: the true mean difference to detect (unit of ``sd_diff``).
        sd_diff: standard deviation σ of the per-seed differences.
        alpha: level of the test.
        power: target probability of p ≤ α.
        max_n: largest n searched.
        alternative: ``greater`` (one-sided) or ``two-sided`` (which detects ``effect`` and ``-effect`` alike).

    Returns:
        The smallest such n, or None when no n reaches the target: always for ``effect`` ≤ 0 one-sided (a test for
        improvement then rejects with probability ≤ α < power at every n) and for ``effect`` = 0 two-sided, and
        when even ``max_n`` seeds fall short. A caller tells the two apart by the sign of ``effect``.

    Raises:
        PowerInputError: σ ≤ 0, non-finite effect, max_n < 2, α / power outside 0 < α < power < 1, or an unknown
            alternative.
    """
    _check_sd(sd_diff)
    _check_levels(alpha, power)
    _check_n(max_n, "max_n")
    _check_alternative(alternative)
    if not math.isfinite(effect):
        raise PowerInputError(f"effect must be a finite number, got {effect!r}")
    if alternative == "two-sided":
        effect = abs(effect)  # the two-sided power is even in the effect
    if effect <= 0:
        return None
    if paired_t_power(effect, sd_diff, max_n, alpha, alternative) < power:
        return None
    # Power rises with n for a positive effect (the critical value falls and λ = δ√n/σ grows), so bisect on n:
    # low always falls short, high always reaches the target.
    low, high = 1, max_n
    while high - low > 1:
        middle = (low + high) // 2
        if paired_t_power(effect, sd_diff, middle, alpha, alternative) >= power:
            high = middle
        else:
            low = middle
    return high


def power_summary(new: Sequence[float], base: Sequence[float], alpha: float = 0.05, power: float = 0.8,
                  max_n: int = 10_000, alternative: str = "greater") -> PowerSummary:
    """The report's power line for one method against the baseline, from the paired per-seed values.

    Args:
        new: the method's values, one per seed.
        base: the baseline's values for the same seeds, in the same order.
        alpha: level of the test.
        power: target power for the minimum detectable effect and the seeds needed.
        max_n: largest number of seeds searched for ``n_needed_for_observed``.
        alternative: ``greater`` (one-sided, the project's default) or ``two-sided``; the test, its MDE and its seed
            count all follow it (the 95% interval is two-sided either way).

    Returns:
        The summary; see :class:`PowerSummary` for when ``mde`` is NaN and ``n_needed_for_observed`` is None.

    Raises:
        PowerInputError: as :func:`paired_difference`, or α / power outside 0 < α < power < 1.
    """
    _check_levels(alpha, power)
    diff = paired_difference(new, base, confidence=0.95, alternative=alternative)
    # Zero spread is a legitimate outcome in a report (a method identical to the baseline gives identical runs);
    # planning has no σ then, so the power columns say "undefined" instead of failing the whole report.
    if diff.sd_diff > 0:
        mde = minimum_detectable_effect(diff.sd_diff, diff.n, alpha, power, alternative)
        needed = seeds_needed(diff.mean_diff, diff.sd_diff, alpha, power, max_n, alternative)
    else:
        mde, needed = float("nan"), None
    return PowerSummary(diff.mean_diff, diff.ci_low, diff.ci_high, diff.sd_diff, diff.n, diff.p, mde, needed,
                        alpha, power, max_n, alternative)
