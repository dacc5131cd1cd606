"""A real Slurm: a 2-method × 2-seed sweep submitted to a cluster on this machine, one job cancelled with ``scancel``,
the same sweep command run again (killed once it has re-submitted, then run a third time), and the results compared
with the local executor's.

The test needs a Slurm whose node is this machine (its files live under pytest's tmp folder):
``bash scripts/slurm_local.sh start`` makes one (root, Debian: it installs slurm-wlm and munge). Without one the test
is skipped and says so. ``TIMM_BNINIT_SLURM=1`` (CI sets it) means "this test must run": the session starts the
local cluster itself, and a cluster that does not come up fails the test instead of skipping it, so CI cannot pass
by silently not testing.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_datasets import make_imagefolder

from timm_bninit.experiment import sweep
from timm_bninit.experiment.sweep import SlurmError, _slurm_parameters, plan_sweep

ROOT = Path(__file__).resolve().parent.parent
JOBS_FILE = Path("submitit") / "jobs.json"  # the sweep's record of which Slurm job ran which run directory
RESULT_KEYS = ("test_acc_at_best_val", "test_acc_last", "best_val_acc", "best_epoch", "epochs")
EPOCHS = 100  # after its first checkpoint a cancelled run outlives the ~5 s from scancel to SIGKILL, even idle


def _why_no_cluster() -> str | None:
    """None when a Slurm controller answers and runs jobs on this machine, else the reason it cannot be used."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch is not on PATH"
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"], capture_output=True, text=True,
                               timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer from slurmctld in 30 s"
    if nodes.returncode:
        return f"sinfo failed: {(nodes.stderr.strip().splitlines() or ['?'])[-1]}"
    states = dict(line.split()[:2] for line in nodes.stdout.splitlines() if len(line.split()) >= 2)
    here = socket.gethostname().split(".")[0]
    if here not in states:
        return f"the cluster's nodes ({', '.join(states) or 'none'}) do not include this machine ({here})"
    if states[here] not in ("idle", "mixed", "allocated", "completing"):  # "idle*": slurmd does not answer
        return f"node {here} is {states[here]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    required = os.environ.get("TIMM_BNINIT_SLURM") == "1"
    if required:
        started = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True,
                                 text=True, timeout=900)
        assert started.returncode == 0, f"scripts/slurm_local.sh start failed:\n{started.stdout}{started.stderr}"
    why = _why_no_cluster()
    if why and required:
        pytest.fail(f"TIMM_BNINIT_SLURM=1 but no usable Slurm: {why}")
    if why:
        pytest.skip(f"no Slurm cluster on this machine ({why}); start one with `bash scripts/slurm_local.sh start` "
                    "(root, Debian) or set TIMM_BNINIT_SLURM=1")


def _compare(args: list[str], log: Path) -> subprocess.Popen:
    # sbatch passes this environment on to the jobs: they import this checkout too. Unbuffered: a killed command's
    # log still says what it did
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "compare.py"), "run", *args], env=env,
                                stdout=handle, stderr=subprocess.STDOUT)


def _results(out: Path) -> dict[str, dict]:
    return {str(path.parent.relative_to(out)): {key: json.loads(path.read_text())[key] for key in RESULT_KEYS}
            for path in sorted(out.rglob("final.json"))}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _jobs(out: Path) -> dict[str, str]:
    return json.loads((out / JOBS_FILE).read_text())


def _first_checkpointed_run(out: Path, deadline: float) -> Path:
    """The first run that has saved an epoch's checkpoint and is not finished yet."""
    while time.time() < deadline:
        for checkpoint in out.glob("*/*/*/checkpoint"):
            if not (checkpoint.parent / "final.json").exists():
                return checkpoint.parent
        time.sleep(0.05)
    raise AssertionError(f"no run of {out} saved a checkpoint in time")


def test_slurm_parameters_are_typed_and_ask_for_a_gpu_only_where_there_are_gpus(tmp_path, monkeypatch):
    # a fake cluster: the default partition "cpu" has no GPUs, partition "gpu" has four per node
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "squeue"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text('#!/bin/sh\ncase "$*" in *--partition=gpu*) echo "gpu gpu:4(S:0-1)" ;;\n'
                                   '*) printf "cpu* (null)\\ngpu gpu:4(S:0-1)\\n" ;; esac\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    assert _slurm_parameters({"timeout_min": "600", "mem_gb": "7.5"}, 1) == {"timeout_min": 600, "mem_gb": 7.5,
                                                                               "tasks_per_node": 1}
    on_gpus = _slurm_parameters({"slurm_partition": "gpu"}, 3)
    assert on_gpus["gpus_per_node"] == 1 and on_gpus["slurm_array_parallelism"] == 3
    assert _slurm_parameters({"slurm_partition": "gpu", "gpus_per_node": "0"}, 1)["gpus_per_node"] == 0
    with pytest.raises(SlurmError, match="--slurm cpus_per_task=two: cpus_per_task must be an integer"):
        _slurm_parameters({"cpus_per_task": "two"}, 1)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(SlurmError, match="needs Slurm's commands .* on PATH"):
        _slurm_parameters({}, 1)


@pytest.mark.slow
def test_slurm_sweep_cancelled_resumed_equals_local(slurm_cluster, tmp_path):
    make_imagefolder(tmp_path / "data", counts={"train": 12, "test": 4})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "model": "test_resnet", "img_size": 16,
        "epochs": EPOCHS, "batch_size": 6, "num_workers": 0, "precise_bn_batches": 2, "val_fraction": 0.25,
        "augmentation": "rrc", "lr": 0.05}))
    grid = ["--recipe", str(recipe), "--methods", "base,bn_gamma01", "--lr", "0.05", "--seeds", "1-2",
            "--data-cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "slurm"
    sweep = [*grid, "--out", str(out), "--executor", "slurm"]

    first = _compare(sweep, tmp_path / "first.log")
    victim = _first_checkpointed_run(out, time.time() + 600)
    job_id = _jobs(out)[str(victim.relative_to(out))]
    subprocess.run(["scancel", job_id], check=True)
    first_log = tmp_path / "first.log"
    assert first.wait(timeout=600) == 1, first_log.read_text()  # 1: not every run finished
    assert f"job {job_id} ended without a result" in first_log.read_text()
    assert not (victim / "final.json").exists(), "the cancelled job finished before SIGKILL: give it more epochs"
    finished = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("final.json")}
    assert len(finished) == 3, first_log.read_text()
    before = _metrics(victim)
    # a kill can land between an epoch's metrics line and its checkpoint: lines after the checkpoint are re-run
    saved = json.loads((victim / "checkpoint" / "trainer_state.json").read_text())["state"]["epoch"]
    assert 1 <= saved <= len(before) < EPOCHS

    # the same command again, killed once it has re-submitted the cancelled run: its job goes on without it
    second = _compare(sweep, tmp_path / "second.log")
    deadline = time.time() + 300
    while _jobs(out)[str(victim.relative_to(out))] == job_id and time.time() < deadline:
        time.sleep(0.05)
    second.kill()
    second.wait(timeout=60)
    resumed_job = _jobs(out)[str(victim.relative_to(out))]
    assert resumed_job != job_id, (tmp_path / "second.log").read_text()
    assert "4 runs: 3 finished, 1 to resume, 0 to start" in (tmp_path / "second.log").read_text()

    # and once more: it waits for that job instead of submitting the run a second time
    third = _compare(sweep, tmp_path / "third.log")
    assert third.wait(timeout=600) == 0, (tmp_path / "third.log").read_text()
    assert f"Slurm job {resumed_job} from an earlier sweep command is still queued or running; waiting for it" \
        in (tmp_path / "third.log").read_text()
    assert _jobs(out)[str(victim.relative_to(out))] == resumed_job
    for path, (stamp, content) in finished.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (stamp, content), f"{path} was run again"
    after = _metrics(victim)
    # resumed, not restarted: the epochs before the cancel are the same lines, timings included
    assert after[:saved] == before[:saved] and len(after) == EPOCHS

    local = tmp_path / "local"
    reference = _compare([*grid, "--out", str(local), "--executor", "local", "--parallel", "2"], tmp_path / "local.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "local.log").read_text()
    slurm_results, local_results = _results(out), _results(local)
    assert len(slurm_results) == 4 and slurm_results == local_results
    for run in slurm_results:
        by_slurm, by_local = _metrics(out / run), _metrics(local / run)
        assert [(m["val_acc"], m["test_acc"]) for m in by_slurm] == [(m["val_acc"], m["test_acc"]) for m in by_local]


def test_two_sweep_commands_on_one_folder_submit_each_run_once(tmp_path, monkeypatch):
    # a fake cluster without GPUs whose sbatch takes a second to answer (the window in which a second shell's sweep
    # command would read jobs.json before the first had recorded its jobs) and whose squeue lists every array task
    bin_dir, state = tmp_path / "bin", tmp_path / "cluster"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {
        "sbatch": f'sleep 1\necho "$*" >> {state}/sbatch\nn=$(wc -l < {state}/sbatch)\n'
                  'echo "Submitted batch job $((1000 + n))"\n',
        "squeue": f'n=$(cat {state}/sbatch 2>/dev/null | wc -l)\nfor i in $(seq 1 "$n"); do for t in 0 1 2 3; do '
                  'echo "$((1000 + i))_$t"; done; done\n',
        "sinfo": 'echo "cpu* (null)"\n', "srun": "exit 0\n"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sweep, "_wait_for_slurm_jobs", lambda jobs, log: None)  # nothing runs on this cluster

    make_imagefolder(tmp_path / "data", counts={"train": 12, "test": 4})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"dataset": "imagefolder", "data_dir": str(tmp_path / "data"),
                                      "model": "test_resnet", "img_size": 16}))
    out = tmp_path / "sweep"
    specs = plan_sweep(str(recipe), "base,bn_gamma01", [0.05], [1, 2], out)
    logs: list[list[str]] = [[], []]
    shells = [threading.Thread(target=sweep._run_slurm, args=(specs, out, 1, None, {}, log.append)) for log in logs]
    for shell in shells:
        shell.start()
    for shell in shells:
        shell.join(timeout=120)
    assert len((state / "sbatch").read_text().splitlines()) == 1  # one job array, from one of the two commands
    assert _jobs(out) == {os.path.relpath(spec.run_dir, out): f"1001_{task}" for task, spec in enumerate(specs)}
    submitter, waiter = sorted(logs, key=lambda log: "submitted" not in log[-1])
    assert submitter == ["submitted 4 runs to Slurm as job 1001 (an array) (logs in " f"{out / 'submitit'})"]
    assert len(waiter) == 4 and all("from an earlier sweep command is still queued or running; waiting for it" in line
                                    for line in waiter)
