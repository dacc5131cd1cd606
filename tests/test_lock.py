"""One run directory, one trainer: the lock refuses a second trainer in one line, and a dead holder's lock is taken
over, even while a process it forked lives on. Sweeps on one folder: tests/test_sweep.py and tests/test_slurm.py."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_datasets import tiny_config

from timm_bninit.experiment.cli import finetune_main
from timm_bninit.experiment.lock import RunDirBusyError, exclusive

ROOT = Path(__file__).resolve().parent.parent

# holds the lock on argv[1], forks a child that outlives it (as a DataLoader worker would), prints the child's pid
HOLDER = """
import multiprocessing, sys, time
from timm_bninit.experiment.lock import exclusive
with exclusive(sys.argv[1]):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``<tmp>/run/run.lock``: ``(process, pid of its forked child)``; both ended at teardown."""
    (tmp_path / "run").mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run" / "run.lock")],
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    child = int(process.stdout.readline())
    yield process, child
    for pid in (process.pid, child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)


def test_a_held_run_directory_is_refused_in_one_line_and_taken_over_once_its_holder_died(tiny_data, tmp_path, holder,
                                                                                          capsys):
    process, child = holder
    config = tiny_config(tiny_data, tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    run_dir, lock = tmp_path / "run", tmp_path / "run" / "run.lock"
    assert finetune_main(["--recipe", str(recipe), "--run-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {run_dir} is being trained by pid {process.pid} on host {socket.gethostname()} since ")
    assert err[0].endswith("; a run directory has one trainer at a time: wait for it to end (a sweep waits by "
                           "itself), or stop that process")
    assert [path.name for path in run_dir.iterdir()] == ["run.lock"]  # nothing written, the holder's file kept

    process.kill()  # SIGKILL: no code of the holder runs, its record stays in the file
    process.wait(timeout=60)
    os.kill(child, 0)  # the child it forked still runs, with a copy of its descriptors
    with exclusive(lock) as left:
        assert left["pid"] == process.pid and left["host"] == socket.gethostname()
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # let go cleanly: the file goes with the lock


def test_a_waiting_process_gets_the_lock_when_its_holder_lets_go(tmp_path):
    lock = tmp_path / "run.lock"
    held, order = threading.Event(), []

    def first() -> None:
        with exclusive(lock):
            held.set()
            time.sleep(0.5)
            order.append("first lets go")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(timeout=30)
    # the holder removes the file while it still holds it; the waiter, which locked that removed file, must notice and
    # lock the path's new file, or a third process could hold the lock beside it
    with exclusive(lock, wait=True) as left:
        order.append("second holds")
        assert left is None  # the first let go properly: no takeover to report
        assert lock.exists() and json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusyError), exclusive(lock):
            pass
    thread.join(timeout=30)
    assert order == ["first lets go", "second holds"]
