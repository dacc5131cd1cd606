"""Every file and folder name of a run and of a sweep, and the only code that reads or writes them by name.

Training and sweep code write through this module; report, plots and study read through it, so a report runs on a
copied results folder without importing training. A run directory::

    config.yaml          the resolved recipe
    metrics.jsonl        one line per epoch (METRICS_KEYS)
    initial_gammas.json  every BN γ when the run started (written once; a resume keeps it)
    final.json           the result (FINAL_KEYS); its presence means "finished" (its status: finished or diverged)
    error.json           a sweep's record of a failed run
    best_model.safetensors, last_model.safetensors
                         the evaluated weights (the EMA's, with one) of the best-validation and of the last epoch
    model_info.json      what the weights need to be used: class names, the evaluation's data config
    final_gammas.json, load_report.json
    checkpoint/          the state after the last finished epoch, its files listed in its manifest.json
    checkpoint.previous/ the state one epoch earlier, kept in case checkpoint/ is damaged
    checkpoint.new/      only while a checkpoint is written
    run.lock             only while a process trains the run (checkpoint.py, lock.py)

A sweep directory holds ``sweep.json`` (the planned grid) and one run directory per cell,
``<method>/lr<lr>/seed<seed>``; with submitit, ``submitit/`` holds the jobs and ``jobs.json``. ``sweep.lock`` is there
while a sweep command updates ``sweep.json`` or submits jobs (two commands on one folder take turns).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import BNInitError

if TYPE_CHECKING:
    from .recipe import Recipe

__all__ = [
    "RunError", "NotASweepError", "CONFIG_FILE", "METRICS_FILE", "FINAL_FILE", "ERROR_FILE", "GAMMAS_FILE",
    "INITIAL_GAMMAS_FILE", "METRICS_KEYS", "read_initial_gammas", "write_initial_gammas",
    "LOAD_REPORT_FILE", "BEST_MODEL_FILE", "LAST_MODEL_FILE", "MODEL_INFO_FILE",
    "CHECKPOINT_DIR", "CHECKPOINT_PREVIOUS", "CHECKPOINT_NEW", "STATE_FILE",
    "EMA_FILE", "MANIFEST_FILE", "LOCK_FILE", "PLAN_FILE", "SWEEP_LOCK_FILE", "SUMMARY_FILE", "SUBMITIT_DIR",
    "JOBS_FILE",
    "STUDY_FILE", "FINAL_KEYS", "RESULT_METRICS", "write_json", "read_json", "run_status", "read_final", "write_final",
    "read_metrics", "append_metrics", "truncate_metrics", "read_gammas", "write_model_info",
    "read_model_info", "write_config", "read_config", "read_error",
    "write_error", "clear_error", "sweep_run_dir", "default_run_dir", "write_plan", "read_plan", "sweep_runs",
    "check_new_run_dir", "is_diverged", "clear_diverged",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
ERROR_FILE = "error.json"
GAMMAS_FILE = "final_gammas.json"
INITIAL_GAMMAS_FILE = "initial_gammas.json"  # every BN γ before the first update, by module name (as GAMMAS_FILE)
LOAD_REPORT_FILE = "load_report.json"
BEST_MODEL_FILE = "best_model.safetensors"
LAST_MODEL_FILE = "last_model.safetensors"
MODEL_INFO_FILE = "model_info.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_PREVIOUS = "checkpoint.previous"
CHECKPOINT_NEW = "checkpoint.new"
STATE_FILE = "trainer_state.json"   # inside checkpoint/: loop counters and the scheduler
EMA_FILE = "ema.pt"                 # inside checkpoint/
MANIFEST_FILE = "manifest.json"     # inside checkpoint/, written last: every file's size and SHA-256
LOCK_FILE = "run.lock"              # the holder of a run directory: host, pid, start
PLAN_FILE = "sweep.json"
SWEEP_LOCK_FILE = "sweep.lock"      # held while a sweep command writes sweep.json or reads, submits and records jobs
SUBMITIT_DIR = "submitit"           # in a sweep: submitit's folders (job scripts, pickles, logs), one per job
JOBS_FILE = "jobs.json"             # in SUBMITIT_DIR: run directory (relative to the sweep) -> its last Slurm job
SUMMARY_FILE = "summaries.json"     # a study part's run summaries
STUDY_FILE = "study.json"           # a study's record: protocol, seeds, wall time, machine
PROTOCOL_FILE = "protocol.yaml"      # a study folder's protocol: seeds and parts (recipe, lr, methods)

# Keys of final.json, as a run writes them; the report's metrics are two of them
FINAL_KEYS = ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last", "selection",
              "epochs", "seed", "method", "initial_effective_scale", "gamma_clamp", "train_images_per_s",
              "train_seconds", "wall_seconds_this_session", "num_updates", "data", "environment", "gamma_change",
              "status", "divergence")
# Keys of a metrics.jsonl line; val_acc and val_loss are None without a validation split. The losses are the mean
# plain cross-entropy over the split, from the same pass (and BN statistics) as the accuracies
METRICS_KEYS = ("epoch", "train_loss", "val_acc", "test_acc", "val_loss", "test_loss", "lr", "lr_gamma", "lrs",
                "images_per_s", "epoch_seconds")
RESULT_METRICS = {"best_val": "test_acc_at_best_val", "last": "test_acc_last"}


class RunError(BNInitError, RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


class NotASweepError(BNInitError, FileNotFoundError):
    """A folder given as a sweep directory that has no plan."""


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically: a reader (or a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # two writers: neither's is lost
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_config(run_dir: Path, config: Recipe) -> None:
    """``config.yaml``: every key of the recipe and its source, sorted; written whole or not at all, since a
    resume reads it back."""
    path = run_dir / CONFIG_FILE
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    os.replace(tmp, path)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``config.yaml`` as written (key -> value), or None when it has none; the recipe module checks it."""
    path = Path(run_dir) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_status(run_dir: str | os.PathLike) -> str:
    """``finished`` or ``diverged`` (final.json), ``failed`` (error.json), ``interrupted`` (a checkpoint or metrics) or
    ``pending``."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_FILE).is_file():
        return "diverged" if is_diverged(read_final(run_dir)) else "finished"
    if (run_dir / ERROR_FILE).is_file():
        return "failed"
    if (run_dir / CHECKPOINT_DIR).exists() or (run_dir / METRICS_FILE).exists():
        return "interrupted"
    return "pending"


def read_final(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``final.json``, or None while it is not finished."""
    path = Path(run_dir) / FINAL_FILE
    return read_json(path) if path.is_file() else None


def write_final(run_dir: Path, final: dict[str, Any]) -> None:
    write_json(run_dir / FINAL_FILE, final)


def is_diverged(final: dict[str, Any] | None) -> bool:
    """Whether a ``final.json`` records a run that diverged (its ``divergence`` says where); one written before runs
    had a status finished."""
    return final is not None and final.get("status") == "diverged"


def clear_diverged(run_dir: str | os.PathLike) -> None:
    """Forget a diverged run's result, so that it runs again (a finished run's is never removed)."""
    if is_diverged(read_final(run_dir)):
        (Path(run_dir) / FINAL_FILE).unlink()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Drop the lines a killed run wrote after the checkpoint it resumes from (epoch > ``epochs``); atomically, so a
    second kill cannot cost the lines kept."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:  # a line a kill cut short: its epoch is trained again
            lines.pop()
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_gammas(run_dir: str | os.PathLike) -> dict[str, list[float]]:
    path = Path(run_dir) / GAMMAS_FILE
    return read_json(path) if path.is_file() else {}


def write_initial_gammas(run_dir: Path, gammas: dict[str, list[float]]) -> None:
    """Record the γ a run starts from, once: a run resumed (or restarted before its first checkpoint, which rebuilds
    the same model from its seed) keeps the file it has."""
    path = run_dir / INITIAL_GAMMAS_FILE
    if not path.is_file():
        write_json(path, gammas)


def read_initial_gammas(run_dir: str | os.PathLike) -> dict[str, list[float]] | None:
    """The γ a run started from, or None for a run started before they were recorded."""
    path = Path(run_dir) / INITIAL_GAMMAS_FILE
    return read_json(path) if path.is_file() else None


def write_model_info(run_dir: Path, class_names: list[str], data_config: dict[str, Any]) -> None:
    """``model_info.json``: the class names in label order and the data config (timm's ``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``) the run evaluated with."""
    write_json(run_dir / MODEL_INFO_FILE, {"class_names": list(class_names), "data_config": data_config})


def read_model_info(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``model_info.json`` (``class_names``, ``data_config``), or None when it has none."""
    path = Path(run_dir) / MODEL_INFO_FILE
    return read_json(path) if path.is_file() else None


def read_error(run_dir: str | os.PathLike) -> str | None:
    path = Path(run_dir) / ERROR_FILE
    return read_json(path)["error"] if path.is_file() else None


def write_error(run_dir: Path, payload: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / ERROR_FILE, payload)


def clear_error(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)


def check_new_run_dir(run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Before a run: the finished result to return (``resume``), or an error for a folder that must not be reused."""
    final = read_final(run_dir)
    if final is not None:
        if resume:
            return final
        raise RunError(f"{run_dir} holds a finished run ({FINAL_FILE}); it is never overwritten. Choose another "
                       f"run directory, or pass --resume to return its result")
    if run_dir.exists() and any(path.name != LOCK_FILE for path in run_dir.iterdir()) and not resume:
        raise RunError(f"{run_dir} holds an unfinished run; pass --resume to continue it from its last checkpoint, "
                       f"or choose another run directory")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Names


def _method_name(config: Recipe) -> str:
    method = config.norm_layer or "bn"
    if config.pretrained or config.pretrained_file:
        method += f"-{config.bn_transfer}"
    if config.gamma_lr_div is not None:
        method += f"-div{config.gamma_lr_div:g}"
    return method


def default_run_dir(config: Recipe, output_dir: str | os.PathLike = "runs") -> Path:
    """A new run directory, timm-style: ``<output_dir>/<recipe>/<method>-lr<lr>-s<seed>-<YYYYmmdd-HHMMSS>``.

    A counter is appended when that name exists already, so running the same command twice gives two runs.
    """
    stem = f"{_method_name(config)}-lr{config.lr:g}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = Path(output_dir) / str(config.recipe)
    candidate, counter = parent / stem, 1
    while candidate.exists():
        counter += 1
        candidate = parent / f"{stem}-{counter}"
    return candidate


def _slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", method.replace("+", "__"))


def sweep_run_dir(out: str | os.PathLike, method: str, lr: float, seed: int) -> Path:
    """The run directory of one sweep cell: ``<out>/<method>/lr<lr>/seed<seed>``."""
    return Path(out) / _slug(method) / f"lr{lr:g}" / f"seed{seed}"


# ---------------------------------------------------------------------------------------------------------------
# Sweeps


def write_plan(out: Path, runs: list[dict[str, Any]]) -> None:
    """Record the grid (merged with an earlier plan), so a report knows every run that should exist."""
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        known = read_json(plan_path)["runs"]
        seen = {r["run_dir"] for r in known}
        runs = known + [r for r in runs if r["run_dir"] not in seen]
    write_json(plan_path, {"runs": runs})


def read_plan(out: str | os.PathLike) -> list[dict[str, Any]]:
    out = Path(out)
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise NotASweepError(f"{out} has no {PLAN_FILE}: not a sweep directory (run `compare.py run ... --out "
                                f"{out}` first)")
    return read_json(plan_path)["runs"]


def sweep_runs(out: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every planned run of a sweep with its ``path``, ``final`` (None unless finished) and ``error``."""
    for entry in read_plan(out):
        run_dir = Path(out) / entry["run_dir"]
        final = read_final(run_dir)
        yield {**entry, "path": run_dir, "final": final, "error": None if final else read_error(run_dir)}
