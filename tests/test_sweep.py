"""Sweeps: the plan, and a real small sweep killed, resumed and reported, its numbers checked against scipy."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_datasets import make_imagefolder
from run_files import files_named
from scipy import stats
from terminal import default_sigint

from timm_bninit.experiment.cli import compare_main, finetune_main
from timm_bninit.experiment.layout import read_metrics
from timm_bninit.experiment.recipe import RecipeError
from timm_bninit.experiment.report import IncompleteSweepError, load_sweep, summarise
from timm_bninit.experiment.sweep import parse_methods, parse_seeds, plan_sweep, run_sweep, sweep_status
from timm_bninit.registry import UnknownNormLayerError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    make_imagefolder(base / "data", counts={"train": 12, "test": 4})
    recipe = base / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset": "imagefolder", "data_dir": str(base / "data"), "model": "test_resnet", "img_size": 16,
        "epochs": 2, "batch_size": 6, "num_workers": 0, "precise_bn_batches": 2, "val_fraction": 0.25,
        "augmentation": "rrc", "lr": 0.05}))
    return recipe


def test_parsers():
    assert parse_seeds("1-3,7, 5") == [1, 2, 3, 5, 7]
    with pytest.raises(RecipeError, match="seed range '3-1' is empty"):
        parse_seeds("3-1")
    with pytest.raises(RecipeError, match="cannot read seeds"):
        parse_seeds("one")
    methods = parse_methods("base,bn_gamma01,bn_gamma01+bn_transfer=reset")
    assert methods == {"base": ["norm_layer=null"], "bn_gamma01": ["norm_layer=bn_gamma01"],
                       "bn_gamma01+bn_transfer=reset": ["norm_layer=bn_gamma01", "bn_transfer=reset"]}
    with pytest.raises(UnknownNormLayerError, match="Did you mean 'bn_gamma01'"):
        parse_methods("base,bn_gama01")
    with pytest.raises(RecipeError, match="listed twice"):
        parse_methods("base,base")


def test_plan_pairs_runs_by_seed(tiny_recipe, tmp_path):
    specs = plan_sweep(str(tiny_recipe), "base,rbn_unit+gamma_lr_div=10", [0.1, 0.01], [1, 2], tmp_path,
                       ["epochs=3"])
    assert len(specs) == 2 * 2 * 2
    by_key = {(s.method, s.lr, s.seed): s.config for s in specs}
    for lr in (0.1, 0.01):
        for seed in (1, 2):
            base, other = by_key[("base", lr, seed)], by_key[("rbn_unit+gamma_lr_div=10", lr, seed)]
            differing = {k for k, v in base.to_dict().items() if other.to_dict()[k] != v}
            assert differing == {"norm_layer", "gamma_lr_div"}  # within a seed only the method differs
            assert base.epochs == 3 and base.lr == lr and base.seed == seed
    assert Path(specs[0].run_dir) == tmp_path / "base" / "lr0.1" / "seed1"


def _launch(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "compare.py"), *args], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, preexec_fn=default_sigint)


@pytest.mark.slow
def test_sweep_killed_resumed_and_reported(tiny_recipe, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--recipe", str(tiny_recipe), "--methods", "base,bn_gamma01", "--lr", "0.05", "--seeds", "1-3",
            "--out", str(out), "--data-cache-dir", str(tmp_path / "cache")]
    first = _launch(args, tmp_path / "first.log")
    deadline = time.time() + 300
    while time.time() < deadline and len(files_named(out, "final.json")) < 2:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    finished_before = {p: p.stat().st_mtime_ns for p in out.rglob("final.json")}
    assert 2 <= len(finished_before) < 6, "the sweep was not killed midway"

    incomplete = r"(?s)planned runs have no result.*bn_gamma01/lr0.05/seed3: not finished"
    with pytest.raises(IncompleteSweepError, match=incomplete):
        summarise(load_sweep(out))

    second = _launch(args, tmp_path / "second.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()
    assert f"{len(finished_before)} finished" in (tmp_path / "second.log").read_text()
    for path, stamp in finished_before.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was re-run"
    assert len(list(out.rglob("final.json"))) == 6

    assert compare_main(["report", str(out)]) == 0
    finals = {(m, s): json.loads((out / m / "lr0.05" / f"seed{s}" / "final.json").read_text())["test_acc_at_best_val"]
              for m in ("base", "bn_gamma01") for s in (1, 2, 3)}
    base = [finals[("base", s)] for s in (1, 2, 3)]
    new = [finals[("bn_gamma01", s)] for s in (1, 2, 3)]
    expected = stats.ttest_rel(new, base, alternative="greater")
    with open(out / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(rows["bn_gamma01"]["mean"]) == pytest.approx(np.mean(new), abs=1e-6)
    assert float(rows["bn_gamma01"]["std"]) == pytest.approx(np.std(new, ddof=1), abs=1e-6)
    assert float(rows["base"]["mean"]) == pytest.approx(np.mean(base), abs=1e-6)
    if np.isnan(expected.pvalue):
        assert rows["bn_gamma01"]["p"] == "nan"
    else:
        assert float(rows["bn_gamma01"]["p"]) == pytest.approx(expected.pvalue, rel=1e-5)
    assert rows["base"]["p"] == "" and rows["bn_gamma01"]["n"] == "3"
    markdown = (out / "report" / "report.md").read_text()
    assert f"{np.mean(new):.2f} ± {np.std(new, ddof=1):.2f} (3)" in markdown
    for name in ("accuracy_per_epoch", "gamma_by_depth", "small_gamma", "initial_scale"):
        png = out / "report" / f"imagefolder_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\\begin{tabular}" in (out / "report" / "report_imagefolder.tex").read_text()


@pytest.mark.slow
def test_failed_runs_are_recorded_and_retried_only_on_request(tiny_recipe, tmp_path):
    specs = plan_sweep(str(tiny_recipe), "base,bn_gamma01+batch_size=1000", [0.05], [1], tmp_path / "out")
    status = run_sweep(specs, tmp_path / "out", data_cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert len(status["finished"]) == 1 and len(status["failed"]) == 1
    error_file = Path(status["failed"][0].run_dir) / "error.json"
    error = json.loads(error_file.read_text())
    assert "fewer than batch_size=1000" in error["error"] and error["seed"] == 1
    stamp = error_file.stat().st_mtime_ns
    messages = []
    run_sweep(specs, tmp_path / "out", data_cache_dir=str(tmp_path / "cache"), log=messages.append)
    assert error_file.stat().st_mtime_ns == stamp and "1 failed (kept" in messages[0]
    with pytest.raises(IncompleteSweepError, match=r"(?s)failed \(.*fewer than batch_size"):
        summarise(load_sweep(tmp_path / "out"))
    run_sweep(specs, tmp_path / "out", retry_failed=True, data_cache_dir=str(tmp_path / "cache"),
              log=lambda _: None)
    assert error_file.stat().st_mtime_ns != stamp  # re-tried (and failed again)


@pytest.mark.slow
def test_submitit_local_executor_runs_the_same_path(tiny_recipe, tmp_path):
    specs = plan_sweep(str(tiny_recipe), "bn_uniform", [0.05], [2], tmp_path / "out", ["epochs=1"])
    status = run_sweep(specs, tmp_path / "out", executor="submitit-local", data_cache_dir=str(tmp_path / "cache"),
                       log=lambda _: None)
    assert len(status["finished"]) == 1
    assert (tmp_path / "out" / "submitit").is_dir()
    assert sweep_status(specs)["finished"] == status["finished"]


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_folder_train_every_run_once(tiny_recipe, tmp_path):
    grid = ["run", "--recipe", str(tiny_recipe), "--methods", "base", "--seeds", "1-2", "--set", "epochs=1",
            "--data-cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "S"
    both = [_launch([*grid, "--out", str(out)], tmp_path / f"{name}.log") for name in ("first", "second")]
    for process, name in zip(both, ("first", "second")):
        assert process.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()
    for seed in (1, 2):  # trained once: a second trainer would have appended a second line
        assert len((out / "base" / "lr0.05" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()) == 1
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("first", "second")]
    assert all("2 of 2 runs finished" in log for log in logs), logs
    assert not list(out.rglob("*.lock"))

    single = _launch([*grid, "--out", str(tmp_path / "single")], tmp_path / "single.log")
    assert single.wait(timeout=600) == 0, (tmp_path / "single.log").read_text()
    for folder in (out, tmp_path / "single"):
        assert compare_main(["report", str(folder), "--no-plots"]) == 0
    for name in ("report.md", "report.csv"):
        assert (out / "report" / name).read_text() == (tmp_path / "single" / "report" / name).read_text(), name


@pytest.mark.slow
def test_a_run_started_by_hand_inside_a_running_sweep_is_refused(tiny_recipe, tmp_path, capsys):
    grid = ["--recipe", str(tiny_recipe), "--set", "epochs=500", "--data-cache-dir", str(tmp_path / "cache")]
    sweep = _launch(["run", *grid, "--methods", "base", "--seeds", "1", "--out", str(tmp_path / "S")],
                    tmp_path / "sweep.log")
    run_dir = tmp_path / "S" / "base" / "lr0.05" / "seed1"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():  # training, its lock held
        time.sleep(0.05)
    try:
        code = finetune_main([*grid, "--set", "norm_layer=null", "--set", "lr=0.05", "--set", "seed=1",
                              "--run-dir", str(run_dir), "--resume", "--quiet"])
        assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()  # still running: the refusal was the lock's
    finally:
        sweep.kill()
        sweep.wait(timeout=60)
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run_dir} is being trained by pid {sweep.pid} on host "), err


# a warm-up that starts at lr 1e5: the loss is NaN within the first epoch (step 4 of the tiny data) for every seed
DIVERGING = "bn_gamma01+warmup_epochs=1+warmup_lr=100000"


@pytest.mark.slow
def test_diverged_runs_are_kept_reported_and_retried_only_on_request(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    specs = plan_sweep(str(tiny_recipe), f"base,{DIVERGING}", [0.05], [1, 2], out)
    messages = []
    status = run_sweep(specs, out, data_cache_dir=str(tmp_path / "cache"), log=messages.append)
    assert [len(status[name]) for name in ("finished", "diverged", "failed", "interrupted", "pending")] == \
        [2, 2, 0, 0, 0]
    assert sum("DIVERGED in epoch 1 at step" in line and "kept, at chance level (33.33%)" in line
               for line in messages) == 2
    finals = {p: (p.stat().st_mtime_ns, json.loads(p.read_text())) for p in out.rglob("final.json")}
    diverged = {p: final for p, (_, final) in finals.items() if final["status"] == "diverged"}
    assert {p.parent.parent.parent.name for p in diverged} == {DIVERGING.replace("+", "__")}
    for path, final in diverged.items():
        assert final["divergence"]["epoch"] == 1 and final["divergence"]["loss"] in ("nan", "inf", "-inf")
        assert final["test_acc_at_best_val"] == final["test_acc_last"] == pytest.approx(100 / 3)
        assert not (path.parent / "error.json").exists() and not (path.parent / "checkpoint").exists()

    messages.clear()  # the same sweep again: nothing is re-run, and it says why
    run_sweep(specs, out, data_cache_dir=str(tmp_path / "cache"), log=messages.append)
    assert messages == ["4 runs: 2 finished, 0 to resume, 0 to start, 0 failed, 2 diverged (kept; --retry-diverged "
                        "re-runs them)"]
    assert {p: p.stat().st_mtime_ns for p in finals} == {p: stamp for p, (stamp, _) in finals.items()}
    grid = ["--recipe", str(tiny_recipe), "--methods", f"base,{DIVERGING}", "--lr", "0.05", "--seeds", "1-2",
            "--out", str(out)]
    assert compare_main(["status", *grid]) == 0
    assert "finished: 2\ndiverged: 2\n" in capsys.readouterr().out

    assert compare_main(["report", str(out)]) == 0  # plots too: they leave the diverged runs out
    with open(out / "report" / "report.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    base = [json.loads((out / "base" / "lr0.05" / f"seed{s}" / "final.json").read_text())["test_acc_at_best_val"]
            for s in (1, 2)]
    expected = stats.ttest_rel([100 / 3] * 2, base, alternative="greater")  # the rule: chance level in the test
    assert rows[DIVERGING]["diverged"] == "2" and float(rows[DIVERGING]["mean"]) == pytest.approx(100 / 3)
    assert rows[DIVERGING]["p"] == "nan" if np.isnan(expected.pvalue) else \
        float(rows[DIVERGING]["p"]) == pytest.approx(expected.pvalue, rel=1e-5)
    assert f"Diverged runs (a non-finite training loss stopped them): {DIVERGING} at lr 0.05: 2 of 2 (seeds 1, 2)" \
        in (out / "report" / "report.md").read_text()

    status = run_sweep(specs, out, retry_diverged=True, data_cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert len(status["diverged"]) == 2
    assert all(path.stat().st_mtime_ns != finals[path][0] for path in diverged)  # re-run, and diverged again
    assert all(finals[path][0] == path.stat().st_mtime_ns for path in finals if path not in diverged)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, signum", [(1, signal.SIGTERM), (2, signal.SIGINT)],
                         ids=["SIGTERM", "parallel-Ctrl-C"])
def test_a_stopped_sweep_reports_interrupted_runs_and_the_same_command_resumes_them(tiny_recipe, tmp_path, parallel,
                                                                                   signum):
    out = tmp_path / "out"
    args = ["run", "--recipe", str(tiny_recipe), "--methods", "base", "--lr", "0.05", "--seeds", "1-2", "--set",
            "epochs=5", "--out", str(out), "--data-cache-dir", str(tmp_path / "cache"), "--parallel", str(parallel)]
    first = _launch(args, tmp_path / "first.log")
    deadline = time.time() + 300
    while not files_named(out, "trainer_state.json") and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signum)  # to the sweep's process only (a parallel sweep's workers leave Ctrl-C to it)
    assert first.wait(timeout=120) == 128 + signum, (tmp_path / "first.log").read_text()
    log = (tmp_path / "first.log").read_text()
    name = signal.Signals(signum).name
    stopped = [line for line in log.splitlines() if f": interrupted by {name} " in line]  # in or after an epoch
    assert len(stopped) == parallel and all(line.endswith("; re-run the sweep to resume it") for line in stopped), log
    assert log.strip().splitlines()[-1].startswith(f"interrupted by {name} while the sweep ran: 2 of its runs to "
                                                   f"resume or start; resume with: python ")
    assert "FAILED" not in log and not list(out.rglob("error.json")) and not list(out.rglob("final.json"))
    grid = args[1:args.index("--data-cache-dir")]
    assert compare_main(["status", *grid]) == 0
    if parallel > 1:
        return  # resuming is the same path at any --parallel (and spawning workers is this test's slowest part)

    second = _launch(args, tmp_path / "second.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()
    for seed in (1, 2):
        run_dir = out / "base" / "lr0.05" / f"seed{seed}"
        assert json.loads((run_dir / "final.json").read_text())["status"] == "finished"
        assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(1, 6))  # each epoch trained once
