"""Power of the paired design, checked against scipy's noncentral t and t evaluated here by hand, formulas written
out in the tests, and published G*Power figures."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats

from timm_bninit.errors import BNInitError
from timm_bninit.experiment import layout
from timm_bninit.experiment.cli import compare_main
from timm_bninit.experiment.power import (
    PowerInputError,
    minimum_detectable_effect,
    paired_difference,
    paired_t_power,
    power_summary,
    seeds_needed,
)


def nct_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """The power formula written out once more, independently of the module: P(T' > t_{1-α,n-1})."""
    return stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n) / sd)


def test_paired_difference_on_written_out_numbers():
    new = [91.0, 90.0, 92.5, 89.5, 90.5]
    base = [90.0, 90.5, 91.0, 89.0, 89.0]
    # differences 1.0, -0.5, 1.5, 0.5, 1.5: mean 0.8, squared deviations 0.04+1.69+0.49+0.09+0.49 = 2.8
    summary = paired_difference(new, base)
    assert summary.n == 5
    assert summary.mean_diff == pytest.approx(0.8, abs=1e-12)
    assert summary.sd_diff == pytest.approx(math.sqrt(2.8 / 4), abs=1e-12)
    half = 2.7764451051977987 * math.sqrt(0.7) / math.sqrt(5)  # t_{0.975, 4} from a table is 2.776
    assert stats.t.ppf(0.975, 4) == pytest.approx(2.7764451051977987, abs=1e-12)
    assert summary.ci_low == pytest.approx(0.8 - half, abs=1e-12)
    assert summary.ci_high == pytest.approx(0.8 + half, abs=1e-12)
    assert summary.ci_low == pytest.approx(-0.2388, abs=1e-4) and summary.ci_high == pytest.approx(1.8388, abs=1e-4)
    # t = 0.8 / (sqrt(0.7)/sqrt(5)) and its one-sided p, and exactly scipy's paired test
    assert summary.t == pytest.approx(0.8 / math.sqrt(0.7 / 5), abs=1e-12)
    assert summary.p == pytest.approx(stats.t.sf(0.8 / math.sqrt(0.7 / 5), 4), rel=1e-12)
    assert summary.p == stats.ttest_rel(new, base, alternative="greater").pvalue


def test_paired_difference_p_matches_scipy_on_random_pairs():
    rng = np.random.default_rng(0)
    for n in (2, 3, 15):
        base = rng.normal(80, 2, n)
        new = base + rng.normal(0.3, 1, n)
        summary = paired_difference(list(new), list(base))
        assert summary.p == stats.ttest_rel(new, base, alternative="greater").pvalue
        assert summary.mean_diff == pytest.approx(float(np.mean(new - base)), abs=1e-12)
        interval = stats.t.interval(0.95, n - 1, loc=np.mean(new - base), scale=stats.sem(new - base))
        assert (summary.ci_low, summary.ci_high) == pytest.approx(interval, abs=1e-10)


@pytest.mark.parametrize("sd,n", [(1.0, 2), (0.7, 3), (1.3, 5), (0.45, 15), (2.0, 40)])
def test_mde_has_exactly_the_target_power(sd, n):
    mde = minimum_detectable_effect(sd, n)
    assert nct_power(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
    assert nct_power(0.99 * mde, sd, n) < 0.8
    assert nct_power(1.01 * mde, sd, n) > 0.8
    # the normal approximation (z_{1-α} + z_power)·σ/√n ignores the t's heavier tails, so it is below the exact MDE
    assert mde > (stats.norm.ppf(0.95) + stats.norm.ppf(0.8)) * sd / math.sqrt(n)


def test_mde_other_levels_and_scale():
    mde = minimum_detectable_effect(1.0, 15, alpha=0.01, power=0.9)
    assert nct_power(mde, 1.0, 15, alpha=0.01) == pytest.approx(0.9, abs=1e-6)
    # δ scales with σ: the noncentrality δ√n/σ solved for depends on n, α and power only
    assert minimum_detectable_effect(3.0, 15) == pytest.approx(3 * minimum_detectable_effect(1.0, 15), rel=1e-9)


@pytest.mark.parametrize("effect,sd", [(0.5, 1.0), (1.0, 0.8), (0.2, 1.5), (2.0, 1.0), (0.05, 1.0)])
def test_seeds_needed_is_the_smallest_n_with_the_target_power(effect, sd):
    n = seeds_needed(effect, sd)
    assert n is not None and n >= 2
    assert nct_power(effect, sd, n) >= 0.8
    if n > 2:
        assert nct_power(effect, sd, n - 1) < 0.8
    normal_n = ((stats.norm.ppf(0.95) + stats.norm.ppf(0.8)) * sd / effect) ** 2
    assert normal_n <= n  # the normal approximation needs fewer seeds than the exact t test
    if normal_n > 10:
        assert n <= 1.1 * normal_n + 2  # ... but not many fewer once n is moderate


def test_published_gpower_figures():
    # G*Power, paired (one-sample) t: d = 0.5, one tailed, α = 0.05, power 0.8 → n = 27 with actual power 0.8118
    assert seeds_needed(0.5, 1.0) == 27
    assert nct_power(0.5, 1.0, 27) == pytest.approx(0.8118, abs=1e-4)
    # Two tailed at α = 0.05 (upper rejection region α/2; the lower one adds < 1e-3 here): d = 0.5 → 34,
    # d = 1 → 10 (UCLA OARC "Power analysis for paired sample t-test", its example 1: mean 5, sd 5)
    assert seeds_needed(0.5, 1.0, alpha=0.025) == 34
    assert seeds_needed(5.0, 5.0, alpha=0.025) == 10
    # Wuensch, "G*Power: t Tests": one sample, d = 1/3, n = 25, two tailed, α = 0.05 → power 0.360
    lower_tail = stats.nct.cdf(-stats.t.ppf(0.975, 24), 24, 5 / 3)
    assert paired_t_power(1 / 3, 1.0, 25, alpha=0.025) + lower_tail == pytest.approx(0.360, abs=5e-4)


def test_seeds_needed_when_nothing_reaches_the_power():
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(-0.4, 1.0) is None
    assert seeds_needed(0.01, 1.0, max_n=100) is None  # needs about 62,000 seeds
    assert nct_power(0.01, 1.0, 100) < 0.8
    assert seeds_needed(6.0, 1.0) == 2  # n = 2 detects 5.79 σ with 80% power (df = 1 has heavy tails)
    assert nct_power(6.0, 1.0, 2) >= 0.8
    assert seeds_needed(5.0, 1.0) == 3 and nct_power(5.0, 1.0, 2) < 0.8 <= nct_power(5.0, 1.0, 3)


def test_paired_t_power_at_zero_effect_is_alpha():
    assert paired_t_power(0.0, 1.0, 10) == pytest.approx(0.05, abs=1e-12)
    assert paired_t_power(0.7, 1.2, 9) == pytest.approx(nct_power(0.7, 1.2, 9), abs=1e-15)


def test_power_summary_fields():
    new = [91.0, 90.0, 92.5, 89.5, 90.5]
    base = [90.0, 90.5, 91.0, 89.0, 89.0]
    summary = power_summary(new, base)
    sd = math.sqrt(0.7)
    assert (summary.mean_diff, summary.n, summary.sd_diff) == (pytest.approx(0.8), 5, pytest.approx(sd))
    assert summary.p == stats.ttest_rel(new, base, alternative="greater").pvalue
    assert nct_power(summary.mde, sd, 5) == pytest.approx(0.8, abs=1e-6)
    needed = summary.n_needed_for_observed
    assert nct_power(0.8, sd, needed) >= 0.8 > nct_power(0.8, sd, needed - 1)
    assert (summary.alpha, summary.power) == (0.05, 0.8)


def test_power_summary_undefined_cases():
    worse = power_summary([89.0, 90.0, 88.0], [90.0, 90.5, 89.0])
    assert worse.mean_diff < 0 and worse.n_needed_for_observed is None and worse.mde > 0
    identical = power_summary([90.0, 91.0, 92.0], [90.0, 91.0, 92.0])
    assert identical.sd_diff == 0 and math.isnan(identical.mde) and identical.n_needed_for_observed is None


@pytest.mark.parametrize("call,message", [
    (lambda: paired_difference([1.0], [2.0]), "number of pairs must be an integer ≥ 2"),
    (lambda: paired_difference([1.0, 2.0, 3.0], [1.0, 2.0]), "one value per seed on each side"),
    (lambda: paired_difference([1.0, float("nan")], [1.0, 2.0]), "must be finite"),
    (lambda: paired_difference(["a", "b"], [1.0, 2.0]), "must be numbers"),
    (lambda: minimum_detectable_effect(0.0, 10), "must be a positive finite number, got 0.0"),
    (lambda: minimum_detectable_effect(1.0, 1), "n must be an integer ≥ 2"),
    (lambda: minimum_detectable_effect(1.0, 10, power=0.04), r"power must be in \(alpha=0.05, 1\)"),
    (lambda: minimum_detectable_effect(1.0, 10, alpha=1.5), r"alpha must be in \(0, 1\)"),
    (lambda: seeds_needed(0.5, -1.0), "positive finite number"),
    (lambda: seeds_needed(0.5, 1.0, max_n=1), "max_n must be an integer ≥ 2"),
    (lambda: seeds_needed(float("inf"), 1.0), "effect must be a finite number"),
])
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(PowerInputError, match=message):
        call()
    assert issubclass(PowerInputError, ValueError) and issubclass(PowerInputError, BNInitError)


# --- compare.py power: planning from a pilot sweep ------------------------------------------------------------


def _pilot(out: Path, values: dict[tuple[str, float], list[float]], seeds: list[int]) -> Path:
    """A finished pilot sweep written through the layout module (what `compare.py run` leaves behind)."""
    entries = []
    for (method, lr), accuracies in values.items():
        for seed, accuracy in zip(seeds, accuracies, strict=True):
            run_dir = layout.sweep_run_dir(out, method, lr, seed)
            run_dir.mkdir(parents=True)
            layout.write_final(run_dir, {"test_acc_at_best_val": accuracy, "test_acc_last": accuracy + 0.25 * seed})
            entries.append({"method": method, "lr": lr, "seed": seed, "recipe": "pilot", "dataset": "fake",
                            "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, entries)
    return out


def _plan_lines(text: str) -> dict[tuple[str, str], list[str]]:
    """The printed plan's rows by (method, lr), split on the column gaps."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 8 and cells[0] == "fake":
            rows[(cells[1], cells[2])] = cells[3:]
    return rows


def _mde_by_hand(sd: float, n: int, alpha: float, power: float) -> float:
    critical = stats.t.ppf(1 - alpha, n - 1)
    nc = optimize.brentq(lambda nc: stats.nct.sf(critical, n - 1, nc) - power, 0, 60, xtol=1e-12)
    return nc * sd / math.sqrt(n)


def _seeds_by_hand(effect: float, sd: float, alpha: float, power: float) -> int:
    n = 2
    while stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n) / sd) < power:
        n += 1
    return n


PILOT_SEEDS = [101, 102, 103, 104]
PILOT = {("base", 0.1): [90.0, 90.5, 91.0, 89.0], ("gamma", 0.1): [91.0, 90.0, 92.5, 89.5],
         ("base", 0.01): [85.0, 84.0, 86.0, 85.5], ("gamma", 0.01): [86.5, 85.2, 86.1, 87.0]}


@pytest.mark.parametrize("argv,alpha,power,planned", [
    ([], 0.05, 0.8, 15),
    (["--power", "0.9", "--alpha", "0.1", "--planned-seeds", "20"], 0.1, 0.9, 20),
])
def test_compare_power_prints_the_plan(tmp_path, capsys, argv, alpha, power, planned):
    pilot = _pilot(tmp_path / "pilot", PILOT, PILOT_SEEDS)
    assert compare_main(["power", "--pilot", str(pilot), "--effect", "0.5", *argv]) == 0
    text = capsys.readouterr().out
    assert f"MDE at {planned} seeds" in text and "seeds for +0.5" in text
    rows = _plan_lines(text)
    assert set(rows) == {("gamma", "0.1"), ("gamma", "0.01")}
    for lr in (0.1, 0.01):
        diff = np.subtract(PILOT[("gamma", lr)], PILOT[("base", lr)])
        sd = float(np.std(diff, ddof=1))
        n, sd_text, seeds, mde_pilot, mde_planned = rows[("gamma", f"{lr:g}")]
        assert n == "4"
        assert float(sd_text) == pytest.approx(sd, abs=5e-4)
        assert int(seeds) == _seeds_by_hand(0.5, sd, alpha, power)
        assert float(mde_pilot) == pytest.approx(_mde_by_hand(sd, 4, alpha, power), abs=5e-4)
        assert float(mde_planned) == pytest.approx(_mde_by_hand(sd, planned, alpha, power), abs=5e-4)


def test_compare_power_uses_the_metric_and_baseline_asked_for(tmp_path, capsys):
    pilot = _pilot(tmp_path / "pilot", PILOT, PILOT_SEEDS)
    assert compare_main(["power", "--pilot", str(pilot), "--effect", "1", "--metric", "last",
                         "--baseline", "gamma"]) == 0
    rows = _plan_lines(capsys.readouterr().out)
    assert set(rows) == {("base", "0.1"), ("base", "0.01")}
    # test_acc_last adds 0.25·seed to both methods, so the paired differences are those of best_val, sign flipped
    diff = np.subtract(PILOT[("base", 0.1)], PILOT[("gamma", 0.1)])
    assert float(rows[("base", "0.1")][1]) == pytest.approx(float(np.std(diff, ddof=1)), abs=5e-4)


def test_compare_power_refuses_bad_plans(tmp_path, capsys):
    pilot = _pilot(tmp_path / "pilot", PILOT, PILOT_SEEDS)
    assert compare_main(["power", "--pilot", str(pilot), "--effect", "-0.5"]) == 2
    assert "effect to detect must be a positive number" in capsys.readouterr().err
    only_base = _pilot(tmp_path / "only_base", {("base", 0.1): PILOT[("base", 0.1)]}, PILOT_SEEDS)
    assert compare_main(["power", "--pilot", str(only_base), "--effect", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "no method paired with 'base'" in err and len(err.strip().splitlines()) == 1
    assert compare_main(["power", "--pilot", str(tmp_path / "nowhere"), "--effect", "0.5"]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


# --- two-sided: the test, its power and its MDE ---------------------------------------------------------------


def _two_sided_power_by_quadrature(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """P(|T'| > t_{1-α/2}) from the definition T' = (Z + λ) / S, S = √(V/df), Z ~ N(0, 1), V ~ χ²_df: integrated over
    S with the normal cdf and the χ² density, so it shares nothing with scipy's noncentral t."""
    df, nc = n - 1, effect * math.sqrt(n) / sd
    critical = stats.t.ppf(1 - alpha / 2, df)

    def rejected(s: float) -> float:  # P(Z + λ > c·s) + P(Z + λ < −c·s), times the density of S at s
        density = stats.chi2.pdf(s * s * df, df) * 2 * s * df  # V = df·S², dV/dS = 2·df·S
        return (stats.norm.sf(critical * s - nc) + stats.norm.cdf(-critical * s - nc)) * density

    from scipy.integrate import quad

    return quad(rejected, 0, np.inf, epsabs=1e-12, epsrel=1e-10, limit=200)[0]


def test_two_sided_p_is_scipys_and_its_ci_duality():
    rng = np.random.default_rng(1)
    for n in (3, 5, 15):
        for _ in range(20):
            base = rng.normal(80, 2, n)
            new = base + rng.normal(rng.uniform(-1, 1), 1, n)
            two = paired_difference(list(new), list(base), alternative="two-sided")
            one = paired_difference(list(new), list(base))
            assert two.p == stats.ttest_rel(new, base, alternative="two-sided").pvalue
            assert two.p == pytest.approx(2 * min(one.p, 1 - one.p), rel=1e-9)  # the two tails of the same t
            assert (two.ci_low, two.ci_high) == (one.ci_low, one.ci_high)
            # the two-sided test at 0.05 rejects exactly when the 95% interval excludes 0
            assert (two.p <= 0.05) == (two.ci_low > 0 or two.ci_high < 0)


def test_two_sided_published_gpower_figures():
    # the figures of test_published_gpower_figures, now asked of the two-sided test itself (both tails counted)
    assert seeds_needed(0.5, 1.0, alternative="two-sided") == 34
    assert seeds_needed(5.0, 5.0, alternative="two-sided") == 10
    assert seeds_needed(-0.5, 1.0, alternative="two-sided") == 34  # either direction
    assert 0.8 <= paired_t_power(0.5, 1.0, 34, alternative="two-sided") < 0.81
    assert paired_t_power(0.5, 1.0, 33, alternative="two-sided") < 0.8
    assert paired_t_power(1 / 3, 1.0, 25, alternative="two-sided") == pytest.approx(0.360, abs=5e-4)
    # G*Power's n = 34 is the smallest n with 80% power at d = 0.5, so the MDE crosses 0.5 between n = 33 and 34
    assert minimum_detectable_effect(1.0, 34, alternative="two-sided") <= 0.5 < \
        minimum_detectable_effect(1.0, 33, alternative="two-sided")
    assert minimum_detectable_effect(1.0, 10, alternative="two-sided") <= 1.0 < \
        minimum_detectable_effect(1.0, 9, alternative="two-sided")


@pytest.mark.parametrize("sd,n", [(1.0, 2), (0.7, 3), (1.3, 5), (0.45, 15), (2.0, 40)])
def test_two_sided_mde_has_the_target_power_by_an_independent_integral(sd, n):
    mde = minimum_detectable_effect(sd, n, alternative="two-sided")
    # quad's error is ~1e-10 here; brentq solved λ to 1e-12: 1e-6 leaves room for both
    assert _two_sided_power_by_quadrature(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
    assert _two_sided_power_by_quadrature(0.99 * mde, sd, n) < 0.8 < _two_sided_power_by_quadrature(1.01 * mde, sd, n)
    # the upper tail alone at α/2 is the one-sided test at α/2; the lower tail only adds power, so the two-sided MDE
    # lies at or just below that one, and above the one-sided MDE at α (a stricter critical value)
    assert minimum_detectable_effect(sd, n) < mde <= minimum_detectable_effect(sd, n, alpha=0.025)
    assert mde > (1.959963984540054 + 0.8416212335729143) * sd / math.sqrt(n)  # normal approximation, z from tables


def test_two_sided_mde_at_15_seeds_by_simulation():
    """A Monte Carlo check that needs no noncentral t at all: 15 pairs with true difference = the MDE (σ = 1)."""
    mde = minimum_detectable_effect(1.0, 15, alternative="two-sided")
    rng = np.random.default_rng(2024)
    diffs = rng.normal(mde, 1.0, size=(200_000, 15))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(15))
    rejected = float(np.mean(np.abs(t) > 2.1447866879169273))  # t_{0.975, 14}, 2.145 in any table
    assert stats.t.ppf(0.975, 14) == pytest.approx(2.1447866879169273, abs=1e-12)
    assert rejected == pytest.approx(0.8, abs=0.004)  # 4.5 Monte Carlo standard errors (√(0.8·0.2/200000) = 0.0009)


def test_two_sided_power_stays_finite_at_large_n():
    # scipy's nct.cdf returns NaN for the lower tail near n = 5,000 at δ = σ/2; the mirrored sf does not
    for n in (34, 1000, 5000, 5674, 10_000):
        assert 0.8 <= paired_t_power(0.5, 1.0, n, alternative="two-sided") <= 1.0
    # a small effect needs thousands of seeds; the lower tail adds power, so at most the one-sided count at α/2
    needed = seeds_needed(0.05, 1.0, alternative="two-sided")
    assert 3000 < needed <= seeds_needed(0.05, 1.0, alpha=0.025)
    assert paired_t_power(0.05, 1.0, needed, alternative="two-sided") >= 0.8 > \
        paired_t_power(0.05, 1.0, needed - 1, alternative="two-sided")
    assert seeds_needed(0.0, 1.0, alternative="two-sided") is None


def test_two_sided_power_summary_and_bad_alternative():
    new, base = [91.0, 90.0, 92.5, 89.5, 90.5], [90.0, 90.5, 91.0, 89.0, 89.0]
    summary = power_summary(new, base, alternative="two-sided")
    assert summary.alternative == "two-sided"
    assert summary.p == stats.ttest_rel(new, base, alternative="two-sided").pvalue
    assert _two_sided_power_by_quadrature(summary.mde, summary.sd_diff, 5) == pytest.approx(0.8, abs=1e-6)
    needed = summary.n_needed_for_observed
    assert _two_sided_power_by_quadrature(0.8, math.sqrt(0.7), needed) >= 0.8 > \
        _two_sided_power_by_quadrature(0.8, math.sqrt(0.7), needed - 1)
    worse = power_summary(base, new, alternative="two-sided")  # the same differences, negated
    assert worse.n_needed_for_observed == needed and worse.mde == summary.mde
    with pytest.raises(PowerInputError, match="alternative must be one of greater, two-sided, got 'less'"):
        paired_difference(new, base, alternative="less")
    with pytest.raises(PowerInputError, match="alternative must be one of"):
        minimum_detectable_effect(1.0, 5, alternative="two_sided")


def test_compare_power_plans_a_two_sided_study(tmp_path, capsys):
    pilot = _pilot(tmp_path / "pilot", PILOT, PILOT_SEEDS)
    assert compare_main(["power", "--pilot", str(pilot), "--effect", "0.5", "--alternative", "two-sided"]) == 0
    text = capsys.readouterr().out
    assert "Two-sided paired t-test" in text
    diff = np.subtract(PILOT[("gamma", 0.1)], PILOT[("base", 0.1)])
    sd = float(np.std(diff, ddof=1))
    _, _, seeds, _, mde_planned = _plan_lines(text)[("gamma", "0.1")]
    assert float(mde_planned) == pytest.approx(minimum_detectable_effect(sd, 15, alternative="two-sided"), abs=5e-4)
    assert _two_sided_power_by_quadrature(0.5, sd, int(seeds)) >= 0.8 > \
        _two_sided_power_by_quadrature(0.5, sd, int(seeds) - 1)
