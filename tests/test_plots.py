"""The report's pictures (issue 11, point 6) on a small sweep folder written through the layout module: every PNG is
written and is an image, the estimation plot draws the paired differences, 95% CIs and p-values computed here with
scipy, no legend or label covers data, and epoch and layer axes have integer ticks."""

import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection, PathCollection

from timm_bninit.experiment import layout
from timm_bninit.experiment.plots import (
    JITTER,
    POINTS_ABOVE,
    _grouped,
    plot_accuracy_per_epoch,
    plot_gamma_by_depth,
    plot_initial_scale,
    plot_paired_differences,
    plot_small_gamma,
)
from timm_bninit.experiment.report import summarise, write_report

SEEDS = [1, 2, 3, 4]
LONG = "bn_gamma01+gamma_lr_div100-a-rather-long-method-name"
# test_acc_at_best_val per seed; the last-epoch accuracy is 0.5 below, and each clamp threshold costs DROPS
ACCURACY = {
    ("base", 0.1): [90.0, 90.5, 91.0, 89.0],
    ("better", 0.1): [91.0, 90.0, 92.5, 89.5],       # differences +1.0, −0.5, +1.5, +0.5: mean 0.625
    (LONG, 0.1): [89.0, 90.0, 90.0, 88.5],           # differences −1.0, −0.5, −1.0, −0.5: mean −0.75
    ("base", 0.01): [80.0, 81.0, 82.0, 83.0],
    ("better", 0.01): [82.0, 81.5, 84.0, 83.5],      # +2.0, +0.5, +2.0, +0.5: mean 1.25
    (LONG, 0.01): [80.5, 81.0, 82.5, 83.0],          # +0.5, 0, +0.5, 0: mean 0.25
}
THRESHOLDS = (0.01, 0.05, 0.1)
DROPS = {"base": (0.0, 0.25, 1.0), "better": (0.5, 2.0, 40.0), LONG: (0.0, 0.0, 0.5)}
EPOCHS = 4


def _fake_sweep(out: Path, accuracy: dict = ACCURACY, seeds: list[int] = SEEDS) -> Path:
    """A finished sweep: final.json, metrics.jsonl and final_gammas.json per run, sweep.json; no training."""
    entries = []
    for (method, lr), values in accuracy.items():
        for seed, value in zip(seeds, values, strict=True):
            run_dir = layout.sweep_run_dir(out, method, lr, seed)
            run_dir.mkdir(parents=True)
            last = value - 0.5
            layout.write_final(run_dir, {
                "test_acc_at_best_val": value, "test_acc_last": last, "initial_effective_scale": 0.1 * (seed + 1),
                "gamma_clamp": [{"threshold": t, "fraction": 0.1, "test_acc": last - drop}
                                for t, drop in zip(THRESHOLDS, DROPS[method])]})
            for epoch in range(1, EPOCHS + 1):
                layout.append_metrics(run_dir, {"epoch": epoch, "test_acc": value - 10.0 / epoch})
            layout.write_json(run_dir / layout.GAMMAS_FILE, {f"layer{d}": [0.005, 0.03, 0.2 * (d + 1), 1.0]
                                                             for d in range(4)})
            entries.append({"method": method, "lr": lr, "seed": seed, "recipe": "fake", "dataset": "fake",
                            "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, entries)
    return out


@pytest.fixture
def sweep(tmp_path):
    return _fake_sweep(tmp_path / "sweep")


PLOTS = ("paired_differences", "accuracy_per_epoch", "gamma_by_depth", "small_gamma", "initial_scale")


def test_every_plot_is_written_as_an_image(sweep, tmp_path):
    written = write_report(sweep, tmp_path / "report")
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == sorted(f"fake_{name}.png" for name in PLOTS)
    for name in pngs:
        with Image.open(tmp_path / "report" / name) as image:
            image.verify()
        with Image.open(tmp_path / "report" / name) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 400 <= width <= 2500 and 250 <= height <= 2000, (name, image.size)
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5, f"{name} is blank"


def _by_gid(fig, gid: str) -> list:
    return [artist for artist in fig.findobj() if artist.get_gid() == gid]


def _paired_by_hand(method: str, lr: float) -> tuple[np.ndarray, float, float, float, float]:
    new, base = np.array(ACCURACY[(method, lr)]), np.array(ACCURACY[("base", lr)])
    diffs = new - base
    n = len(diffs)
    half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
    p = stats.ttest_rel(new, base, alternative="greater").pvalue
    return diffs, diffs.mean(), diffs.mean() - half, diffs.mean() + half, p


@pytest.mark.parametrize("use_holm", [False, True])
def test_estimation_plot_draws_the_paired_differences_ci_and_p(sweep, use_holm):
    table = summarise(list(layout.sweep_runs(sweep)), use_holm=use_holm)[0]
    colours = {m: "C0" for m in table.methods}
    fig = plot_paired_differences(table, colours)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["lr 0.1", "lr 0.01"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["better", LONG]
    p_by_hand = {lr: [_paired_by_hand(m, lr)[4] for m in ("better", LONG)] for lr in (0.1, 0.01)}
    for ax, lr in zip(fig.axes, (0.1, 0.01)):
        for row, method in enumerate(("better", LONG)):
            diffs, mean, low, high, p = _paired_by_hand(method, lr)
            points = next(a for a in _by_gid(fig, f"seeds/{method}") if isinstance(a, PathCollection) and a.axes is ax)
            offsets = np.asarray(points.get_offsets())
            np.testing.assert_allclose(offsets[:, 0], diffs, atol=1e-9)
            assert np.all(np.abs(offsets[:, 1] - (row - POINTS_ABOVE)) <= JITTER)
            ci = [a for a in _by_gid(fig, f"mean_ci/{method}") if a.axes is ax]
            marker = next(a for a in ci if isinstance(a, matplotlib.lines.Line2D) and a.get_marker() == "D")
            assert marker.get_xdata()[0] == pytest.approx(mean, abs=1e-9) and marker.get_ydata()[0] == row
            (segment,) = next(a for a in ci if isinstance(a, LineCollection)).get_segments()
            np.testing.assert_allclose(segment, [[low, row], [high, row]], atol=1e-9)
            if use_holm:  # two methods per column: the smaller p × 2, the larger p × 1 (never below the first)
                ordered = sorted(p_by_hand[lr])
                holm = {ordered[0]: min(1, 2 * ordered[0]), ordered[1]: max(min(1, 2 * ordered[0]), ordered[1])}
                p = holm[p]
            (text,) = [a for a in _by_gid(fig, f"text/{method}") if a.axes is ax]
            interval = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]".replace("-", "−")
            assert text.get_text() == f"{interval}\n{'p (Holm)' if use_holm else 'p'} = {p:.3g}, n = 4"
    assert _paired_by_hand("better", 0.1)[1] == pytest.approx(0.625)
    zero_lines = [line for ax in fig.axes for line in ax.get_lines() if list(line.get_xdata()) == [0, 0]]
    assert len(zero_lines) == 2
    plt.close(fig)


def test_estimation_plot_and_report_table_show_the_same_p(sweep, tmp_path):
    write_report(sweep, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| better |"))
    table_p = [cell.strip() for cell in row.strip("|").split("|")][2::2]
    fig = plot_paired_differences(summarise(list(layout.sweep_runs(sweep)))[0], {"better": "C0", LONG: "C1"})
    plot_p = [text.get_text().split("p = ")[1].split(",")[0] for text in _by_gid(fig, "text/better")]
    assert plot_p == table_p
    plt.close(fig)


def test_a_single_seed_row_has_points_but_no_interval(tmp_path):
    out = _fake_sweep(tmp_path / "sweep", {("base", 0.1): [90.0], ("better", 0.1): [91.0]}, [7])
    fig = plot_paired_differences(summarise(list(layout.sweep_runs(out)))[0], {"base": "C0", "better": "C1"})
    (points,) = _by_gid(fig, "seeds/better")
    np.testing.assert_allclose(np.asarray(points.get_offsets())[:, 0], [1.0])
    assert _by_gid(fig, "mean_ci/better") == []
    assert [t.get_text() for t in _by_gid(fig, "text/better")] == ["n = 1: no CI or test"]
    plt.close(fig)


def _figures(sweep: Path) -> dict:
    runs = list(layout.sweep_runs(sweep))
    groups = _grouped(runs)
    methods = ["base", "better", LONG]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    return {
        "paired_differences": plot_paired_differences(summarise(runs)[0], colours),
        "accuracy_per_epoch": plot_accuracy_per_epoch(groups, "fake", methods, [0.1, 0.01], colours),
        "gamma_by_depth": plot_gamma_by_depth(groups, "fake", methods, 0.1, colours),
        "small_gamma": plot_small_gamma(groups, "fake", methods, 0.1, colours),
        "initial_scale": plot_initial_scale(groups, "fake", methods, 0.1, colours),
    }


def test_legends_and_labels_cover_no_data_and_stay_inside_the_figure(sweep):
    figures = _figures(sweep)
    legends = 0
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        figure_box = fig.bbox
        for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]:
            legends += 1
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: legend over an axes"
            assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, name
        for ax in fig.axes:  # points and bars inside their own axes, so a legend outside every axes misses them
            data = [c.get_window_extent(renderer) for c in ax.collections + ax.patches]
            area = ax.get_window_extent(renderer)
            for box in data:
                assert area.x0 - 1 <= box.x0 and box.x1 <= area.x1 + 1, f"{name}: data outside its axes"
        for text in _by_gid_prefix(fig, "text/"):  # the estimation plot's stats beside each row
            box = text.get_window_extent(renderer)
            assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes), text.get_text()
            assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1, f"{text.get_text()!r} cut off"
        for ax in fig.axes:  # tick labels (the long method name) inside the figure
            for label in ax.get_yticklabels():
                box = label.get_window_extent(renderer)
                assert box.x0 >= figure_box.x0 - 0.5, f"{name}: {label.get_text()!r} cut off"
        plt.close(fig)
    assert legends == 4  # every figure but the initial-scale bars (one bar per method, labelled) has one


def _by_gid_prefix(fig, prefix: str) -> list:
    return [a for a in fig.findobj() if (a.get_gid() or "").startswith(prefix)]


def test_epoch_and_layer_axes_have_integer_ticks(sweep):
    figures = _figures(sweep)
    for name in ("accuracy_per_epoch", "gamma_by_depth"):
        fig = figures[name]
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)
    for fig in figures.values():
        plt.close(fig)


def test_clamping_plot_shows_the_accuracy_drop_per_threshold(sweep):
    runs = list(layout.sweep_runs(sweep))
    fig = plot_small_gamma(_grouped(runs), "fake", ["base", "better", LONG], 0.1, {"base": "C0", "better": "C1",
                                                                                   LONG: "C2"})
    for method, drops in DROPS.items():
        bars = [patch for patch in _by_gid(fig, f"drop/{method}")]
        assert [bar.get_height() for bar in bars] == pytest.approx(list(drops), abs=1e-9)
    # the fractions below 0.01, 0.05, 0.1 of the fake γ (0.005, 0.03, 0.2·(d+1), 1.0 per layer): 1/4, 2/4, 2/4
    fractions = [bar.get_height() for bar in _by_gid(fig, "fraction/base")]
    assert fractions == pytest.approx([25.0, 50.0, 50.0])
    right = fig.axes[1]
    assert right.get_ylim()[1] < 60  # zoomed to the drops (at most 40 points), not a 0-100 accuracy axis
    plt.close(fig)


def test_gamma_by_depth_turns_logarithmic_when_one_method_sits_ten_times_lower(sweep):
    methods = ["base", "better", LONG]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = plot_gamma_by_depth(_grouped(list(layout.sweep_runs(sweep))), "fake", methods, 0.1, colours)
    assert fig.axes[0].get_yscale() == "linear"  # the same γ everywhere: nothing to separate
    plt.close(fig)
    for seed in SEEDS:  # γ0 = 0.1 against 1: the small band would be a flat line on a linear axis
        run_dir = layout.sweep_run_dir(sweep, "better", 0.1, seed)
        layout.write_json(run_dir / layout.GAMMAS_FILE, {f"layer{d}": [0.09, 0.1, 0.11] for d in range(4)})
        run_dir = layout.sweep_run_dir(sweep, "base", 0.1, seed)
        layout.write_json(run_dir / layout.GAMMAS_FILE, {f"layer{d}": [0.9, 1.0, 1.1] for d in range(4)})
    fig = plot_gamma_by_depth(_grouped(list(layout.sweep_runs(sweep))), "fake", methods, 0.1, colours)
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_ylabel() == "γ (log scale)"
    plt.close(fig)


# --- labels and learning curves -------------------------------------------------------------------------------

PLOT_LABELS = {"base": "BASE", "better": "γ-init", LONG: "BN γ0=0.269 (a long label)"}


def _with_validation(sweep: Path) -> Path:
    """The fake sweep's runs with a validation accuracy and loss per epoch as well (what runs record now)."""
    for run in layout.sweep_runs(sweep):
        records = layout.read_metrics(run["path"])
        (run["path"] / layout.METRICS_FILE).unlink()
        for record in records:
            epoch = record["epoch"]
            layout.append_metrics(run["path"], {**record, "val_acc": record["test_acc"] + 1.0,
                                                "val_loss": 2.0 / epoch + 0.01 * run["seed"], "test_loss": 1.0})
    return sweep


def test_every_plot_names_the_methods_by_their_labels(sweep):
    runs = list(layout.sweep_runs(sweep))
    groups = _grouped(runs)
    methods = ["base", "better", LONG]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    table = summarise(runs, labels=PLOT_LABELS)[0]
    fig = plot_paired_differences(table, colours)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["γ-init", "BN γ0=0.269 (a long label)"]
    assert fig.axes[0].get_xlabel() == "method − BASE (percentage points)"
    legends = {
        "accuracy_per_epoch": plot_accuracy_per_epoch(groups, "fake", methods, [0.1, 0.01], colours, PLOT_LABELS),
        "gamma_by_depth": plot_gamma_by_depth(groups, "fake", methods, 0.1, colours, PLOT_LABELS),
        "small_gamma": plot_small_gamma(groups, "fake", methods, 0.1, colours, PLOT_LABELS),
    }
    for name, figure in legends.items():
        texts = [t.get_text() for t in figure.legends[0].get_texts()]
        assert [t.split(" (n=")[0] for t in texts] == list(PLOT_LABELS.values()), name
        plt.close(figure)
    bars = plot_initial_scale(groups, "fake", methods, 0.1, colours, PLOT_LABELS)
    assert [t.get_text() for t in bars.axes[0].get_yticklabels()] == list(PLOT_LABELS.values())
    for figure in (fig, bars):
        plt.close(figure)


def test_learning_curves_plot_draws_the_mean_per_epoch(tmp_path):
    from timm_bninit.experiment.convergence import learning_curves
    from timm_bninit.experiment.plots import plot_learning_curves

    sweep = _with_validation(_fake_sweep(tmp_path / "sweep"))
    methods = ["base", "better", LONG]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = plot_learning_curves(learning_curves(list(layout.sweep_runs(sweep)), "fake"), "fake", methods, [0.1, 0.01],
                               colours, PLOT_LABELS)
    assert len(fig.axes) == 6  # two learning rates × (validation accuracy, validation loss, test accuracy)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["lr 0.1: validation accuracy (%)",
                                                       "lr 0.1: validation loss (cross-entropy)",
                                                       "lr 0.1: test accuracy (%)"]
    for method in methods:
        values = np.array(ACCURACY[(method, 0.1)])
        (line,) = [a for a in _by_gid(fig, f"curve/val_acc/{method}") if a.axes is fig.axes[0]]
        np.testing.assert_allclose(line.get_xdata(), range(1, EPOCHS + 1))
        # val acc = test acc + 1 = value − 10/epoch + 1, averaged over the seeds
        np.testing.assert_allclose(line.get_ydata(), [values.mean() - 10.0 / e + 1.0 for e in range(1, EPOCHS + 1)],
                                   atol=1e-9)
        (loss,) = [a for a in _by_gid(fig, f"curve/val_loss/{method}") if a.axes is fig.axes[1]]
        np.testing.assert_allclose(loss.get_ydata(), [2.0 / e + 0.01 * np.mean(SEEDS) for e in range(1, EPOCHS + 1)],
                                   atol=1e-9)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == [f"{label} (n=4)" for label in PLOT_LABELS.values()]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert all(float(t).is_integer() for t in ax.get_xticks() if low <= t <= high)
    plt.close(fig)


def test_a_report_of_runs_with_losses_draws_the_learning_curves(tmp_path):
    sweep = _with_validation(_fake_sweep(tmp_path / "sweep"))
    written = write_report(sweep, tmp_path / "report", labels=PLOT_LABELS)
    assert sorted(p.name for p in written if p.suffix == ".png") == sorted(
        f"fake_{name}.png" for name in (*PLOTS, "learning_curves"))
    with Image.open(tmp_path / "report" / "fake_learning_curves.png") as image:
        assert image.format == "PNG" and 800 <= image.size[0] <= 2500 and np.asarray(image.convert("L")).std() > 5
    assert "### Learning curves (fake)" in (tmp_path / "report" / "report.md").read_text()
