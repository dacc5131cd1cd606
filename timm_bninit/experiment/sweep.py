"""The sweep: plan a grid of recipe × method × lr × seed and run it resumably (comparing is :mod:`.report`'s job).

Every cell of the grid is an ordinary run directory (:func:`.layout.sweep_run_dir`). Running a sweep
again never re-runs or overwrites a finished run (``final.json``), resumes interrupted ones from their checkpoint,
and re-tries failed ones (``error.json``) and diverged ones (a ``final.json`` with ``status: diverged``) only when
asked. SIGTERM or Ctrl-C stops the runs under way at a step boundary (:mod:`.stopping`) and the sweep with them; the
same command resumes them.

A method is ``base`` (plain BN, γ0 = 1, c = 1: the paper's BASE), a registered norm-layer name (``bn_gamma01``), or
either followed by recipe overrides: ``bn_gamma01+bn_transfer=reset``, ``base+gamma_lr_div=100``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

import submitit
import torch
from submitit.core.utils import FailedJobError, FailedSubmissionError

from ..errors import BNInitError
from ..registry import resolve_norm_layer
from . import layout
from .lock import RunDirBusyError, describe_holder, exclusive
from .recipe import Recipe, RecipeError, apply_overrides, check_config, import_user_modules, load_recipe
from .stopping import RunInterrupted, StopRequest, follow_sweep, stop_on_signals, stop_requested, sweep_stopped
from .train import run_finetune

__all__ = ["RunSpec", "parse_methods", "parse_seeds", "parse_floats", "plan_sweep", "run_sweep", "sweep_status"]


@dataclass(frozen=True)
class RunSpec:
    """One cell of a sweep: the resolved config and where it runs."""

    method: str
    lr: float
    seed: int
    run_dir: str
    config: Recipe


def parse_seeds(text: str) -> list[int]:
    """``'1-15'``, ``'1,3,5'`` or ``'1-3,7'`` -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            low, high = int(match[1]), int(match[2])
            if low > high:
                raise RecipeError(f"seed range {part!r} is empty; write it low-high, e.g. 1-15")
            seeds.update(range(low, high + 1))
        elif part.isdigit():
            seeds.add(int(part))
        else:
            raise RecipeError(f"cannot read seeds {text!r}: use a range like 1-15 or a list like 1,2,3")
    return sorted(seeds)


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"cannot read learning rates {text!r}: use a list like 0.1,0.01") from None


def parse_methods(text: str | Sequence[str]) -> dict[str, list[str]]:
    """Method strings -> recipe overrides. ``base`` is plain BN; ``name+key=value+...`` adds overrides."""
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not items:
        raise RecipeError("no methods given; e.g. --methods base,bn_gamma01,rbn,iebn")
    methods: dict[str, list[str]] = {}
    for item in items:
        name, *extra = item.split("+")
        overrides = ["norm_layer=null"] if name == "base" else [f"norm_layer={name}"]
        if name != "base":
            resolve_norm_layer(name)  # unknown names fail here, with the list of known ones
        for override in extra:
            if "=" not in override:
                raise RecipeError(f"method {item!r}: {override!r} is not key=value (e.g. bn_gamma01+bn_transfer=reset)")
        if item in methods:
            raise RecipeError(f"method {item!r} is listed twice")
        methods[item] = overrides + extra
    return methods


def plan_sweep(recipe: str, methods: str | Sequence[str], lrs: Iterable[float] | None, seeds: Iterable[int],
               out: str | os.PathLike, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """The grid recipe × method × lr × seed; within a seed only the method's overrides differ.

    Every cell's configuration is checked here, before any run starts; ``lrs`` None or empty: the recipe's lr. The
    recipe's ``imports`` are imported first: a method may name a norm layer one of them registers.
    """
    base = apply_overrides(load_recipe(recipe), overrides)
    import_user_modules(base.imports)
    specs = []
    for method, method_overrides in parse_methods(methods).items():
        for lr in lrs or [base.lr]:
            for seed in seeds:
                config = apply_overrides(base, [*method_overrides, f"lr={lr!r}", f"seed={seed}"])
                check_config(config)
                run_dir = layout.sweep_run_dir(out, method, lr, seed)
                specs.append(RunSpec(method, float(lr), int(seed), str(run_dir), config))
    return specs


def sweep_status(specs: Sequence[RunSpec]) -> dict[str, list[RunSpec]]:
    status: dict[str, list[RunSpec]] = {"finished": [], "diverged": [], "failed": [], "interrupted": [],
                                        "pending": []}
    for spec in specs:
        status[layout.run_status(spec.run_dir)].append(spec)
    return status


def run_one(spec: RunSpec, data_cache_dir: str | None = None, threads: int | None = None,
            wait: bool = True) -> dict[str, Any]:
    """Run (or resume) one cell; a failure is recorded in ``error.json`` instead of stopping the sweep, a stop asked by
    a signal is not a failure (the run resumes next time).

    A cell another process is training (another sweep command, a run started by hand) is waited for, or with ``wait``
    false left to it: ``{"status": "elsewhere", "holder": ...}``. Either way this process never trains it meanwhile.
    """
    run_dir = Path(spec.run_dir)
    if sweep_stopped():  # handed to this worker before the sweep stopped (the pool queues one more than it runs)
        return {"status": "not started", "run_dir": str(run_dir)}
    if threads:
        torch.set_num_threads(threads)
    try:  # in whichever process runs it (a spawned worker, a submitit or Slurm job): check_config imports `imports`
        final = run_finetune(spec.config, run_dir, resume=True, quiet=True, data_cache_dir=data_cache_dir, wait=wait)
    except RunDirBusyError as error:  # not this process's run: nothing of it is touched
        return {"status": "elsewhere", "run_dir": str(run_dir), "holder": describe_holder(error.holder)}
    except RunInterrupted as stop:
        return {"status": "interrupted", "run_dir": str(run_dir), "message": str(stop)}
    except Exception as error:  # a sweep records the failure and goes on
        layout.write_error(run_dir, {"method": spec.method, "lr": spec.lr, "seed": spec.seed,
                                     "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        return {"status": "failed", "run_dir": str(run_dir), "error": f"{type(error).__name__}: {error}"}
    layout.clear_error(run_dir)
    if layout.is_diverged(final):
        return {"status": "diverged", "run_dir": str(run_dir), "divergence": final["divergence"]}
    return {"status": "finished", "run_dir": str(run_dir), "test_acc": final["test_acc_at_best_val"]}


def run_sweep(specs: Sequence[RunSpec], out: str | os.PathLike, *, parallel: int = 1, retry_failed: bool = False,
              retry_diverged: bool = False, executor: str = "local", data_cache_dir: str | None = None,
              slurm: dict[str, Any] | None = None, log=print) -> dict[str, list[RunSpec]]:
    """Run every unfinished cell: ``local`` (``parallel`` runs side by side on this machine's cores) or through
    submitit (``submitit-local`` on this machine, ``slurm`` on a cluster). Returns the final status.

    Raises:
        RunInterrupted: SIGTERM or SIGINT stopped the sweep; the runs under way stopped at a step boundary (a local
            sweep's), and the same call resumes them.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / layout.SWEEP_LOCK_FILE, wait=True):  # another sweep command's grid is merged, not lost
        _write_plan(out, specs)
    status = sweep_status(specs)
    todo = status["interrupted"] + status["pending"] + (status["failed"] if retry_failed else []) + \
        (status["diverged"] if retry_diverged else [])
    log(f"{len(specs)} runs: {len(status['finished'])} finished, {len(status['interrupted'])} to resume, "
        f"{len(status['pending'])} to start, {len(status['failed'])} failed"
        + (" (re-trying)" if retry_failed and status["failed"] else
           " (kept; --retry-failed re-runs them)" if status["failed"] else "")
        + (f", {len(status['diverged'])} diverged" + (" (re-trying)" if retry_diverged else
                                                       " (kept; --retry-diverged re-runs them)")
           if status["diverged"] else ""))
    for spec in status["failed"] if retry_failed else []:
        layout.clear_error(spec.run_dir)
    for spec in status["diverged"] if retry_diverged else []:
        layout.clear_diverged(spec.run_dir)
    if not todo:
        return sweep_status(specs)
    if executor not in ("local", "submitit-local", "slurm"):
        raise RecipeError(f"unknown executor {executor!r}; choose local, submitit-local or slurm")
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(parallel, 1))
    with stop_on_signals() as stop:  # the runs of this process follow it too
        if executor == "local":
            # first the runs no other process trains, then wait for the others (another sweep command on this
            # folder): each is then finished, or resumed here if its trainer stopped before the end
            elsewhere = _run_local(todo, parallel, threads, data_cache_dir, stop, log, wait=False)
            if elsewhere and not stop.requested():
                log(f"waiting for {len(elsewhere)} run{'s' if len(elsewhere) > 1 else ''} that another process trains")
                _run_local(elsewhere, parallel, threads, data_cache_dir, stop, log, wait=True)
        else:
            _run_submitit(todo, out, executor, parallel, threads, data_cache_dir, slurm or {}, log)
    final = sweep_status(specs)
    if stop.requested():
        left = len(final["interrupted"]) + len(final["pending"])
        raise RunInterrupted(stop.requested(), f"while the sweep ran: {left} of its runs to resume or start")
    return final


def _run_local(todo: Sequence[RunSpec], parallel: int, threads: int, data_cache_dir: str | None, stop: StopRequest,
               log, wait: bool) -> list[RunSpec]:
    """Run ``todo`` here, one at a time or ``parallel`` side by side; returns those another process was training."""
    elsewhere = []

    def report(spec: RunSpec, result: dict[str, Any]) -> None:
        log(_describe(spec, result))
        if result["status"] == "elsewhere":
            elsewhere.append(spec)

    if parallel <= 1:
        for spec in todo:
            if stop.requested():
                break
            report(spec, run_one(spec, data_cache_dir, wait=wait))
    else:
        _run_parallel(todo, parallel, threads, data_cache_dir, stop, report, wait)
    return elsewhere


def _run_parallel(todo: Sequence[RunSpec], parallel: int, threads: int, data_cache_dir: str | None,
                  stop: StopRequest, report, wait: bool) -> None:
    """One process per run: isolates failures and keeps each run's threads to its share of the cores.

    A stop request (SIGTERM or Ctrl-C, which the workers leave to this process) cancels the runs not started and
    reaches the runs under way through a shared value, which their step checks read; a second Ctrl-C kills them.
    """
    context = get_context("spawn")
    shared = context.Value("i", 0, lock=False)  # written by the signal handler: no lock it could wait on
    stop.forward = shared
    try:
        with ProcessPoolExecutor(max_workers=parallel, mp_context=context, initializer=follow_sweep,
                                 initargs=(shared,)) as pool:
            futures = {pool.submit(run_one, spec, data_cache_dir, threads, wait): spec for spec in todo}
            waiting, cancelled = set(futures), False
            try:
                while waiting:
                    done, waiting = wait_for(waiting, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        if not future.cancelled():
                            report(futures[future], future.result())
                    if stop.requested() and not cancelled:
                        shared.value = stop.requested()  # the handler has written it, unless no signal asked
                        for future in waiting:
                            future.cancel()
                        cancelled = True
            except KeyboardInterrupt:
                for child in active_children():
                    child.kill()
                raise
    finally:
        stop.forward = None


# ---------------------------------------------------------------------------------------------------------------
# Through submitit: its local executor, or Slurm job arrays

SUBMITIT_DIR, JOBS_FILE = layout.SUBMITIT_DIR, layout.JOBS_FILE
SLURM_POLL_SECONDS = 2.0
# generic submitit parameters and their types; --slurm KEY=VALUE gives strings, submitit asserts these types
_TYPED_PARAMETERS = {"timeout_min": int, "mem_gb": float, "nodes": int, "cpus_per_task": int, "gpus_per_node": int,
                     "tasks_per_node": int}


class SlurmError(BNInitError, RuntimeError):
    """Slurm cannot be used as asked: no client on PATH, or parameters it refuses."""


def _run_submitit(todo: Sequence[RunSpec], out: Path, executor: str, parallel: int, threads: int,
                  data_cache_dir: str | None, slurm: dict[str, Any], log) -> None:
    if executor == "slurm":
        _run_slurm(todo, out, parallel, data_cache_dir, slurm, log)
        return
    runner = submitit.LocalExecutor(folder=out / SUBMITIT_DIR / "%j")
    runner.update_parameters(timeout_min=24 * 60, visible_gpus=())
    with runner.batch():
        jobs = [(spec, runner.submit(run_one, spec, data_cache_dir, threads)) for spec in todo]
    for spec, job in jobs:
        try:
            log(_describe(spec, job.result()))
        except Exception as error:  # the job itself died: the run resumes next time
            log(f"{_head(spec)}: job failed ({error}); re-run the sweep to resume")
        if stop_requested():  # the jobs go on: the same command waits for them, or resumes their runs
            log("stopped waiting for the submitit jobs")
            return


def _run_slurm(todo: Sequence[RunSpec], out: Path, parallel: int, data_cache_dir: str | None,
               slurm: dict[str, Any], log) -> None:
    """Submit the runs as one job array and wait for it; ``<out>/submitit/jobs.json`` records which job ran which
    run directory."""
    (out / SUBMITIT_DIR).mkdir(parents=True, exist_ok=True)
    # jobs.json is read, the missing jobs submitted and recorded under one lock: a sweep command started meanwhile on
    # this folder (another shell) then finds them recorded and waits for them instead of submitting them again
    with exclusive(out / layout.SWEEP_LOCK_FILE, wait=True):
        jobs = _submit_slurm_jobs([spec for spec in todo if layout.run_status(spec.run_dir) != "finished"], out,
                                  parallel, data_cache_dir, slurm, log)
    _wait_for_slurm_jobs(jobs, log)


def _submit_slurm_jobs(todo: Sequence[RunSpec], out: Path, parallel: int, data_cache_dir: str | None,
                       slurm: dict[str, Any], log) -> list[tuple[RunSpec, Any]]:
    """(under the jobs lock) The job of every run in ``todo``: still queued from an earlier command, or submitted."""
    folder = out / SUBMITIT_DIR / "%j"
    # a job an earlier sweep command submitted (that command was killed, the job went on) is waited for, not
    # submitted again: two jobs on one run directory would race on its checkpoint
    known = _read_jobs(out)
    recorded = [(spec, known.get(_relative_run_dir(spec, out))) for spec in todo]
    queued = _queued_slurm_jobs({job_id for _, job_id in recorded if job_id}) or set()
    jobs = [(spec, submitit.SlurmJob(folder=folder, job_id=job_id)) for spec, job_id in recorded if job_id in queued]
    for spec, job in jobs:
        log(f"{_head(spec)}: Slurm job {job.job_id} from an earlier sweep command is still queued or running; "
            "waiting for it")
    submit = [spec for spec, job_id in recorded if job_id not in queued]
    if submit:
        parameters = _slurm_parameters(slurm, parallel)
        runner = submitit.AutoExecutor(folder=folder, cluster="slurm")
        try:
            runner.update_parameters(**parameters)
        except (AssertionError, NameError, TypeError, ValueError) as error:  # submitit's checks of the parameters
            raise SlurmError(f"--slurm parameters refused by submitit: {str(error).splitlines()[0]}") from None
        try:
            with runner.batch():  # one job array
                submitted = [(spec, runner.submit(_run_one_in_slurm_job, spec, data_cache_dir)) for spec in submit]
        except (FailedJobError, FailedSubmissionError) as error:  # sbatch said no: its own message says why
            raise SlurmError(f"sbatch refused the jobs: {' '.join(str(error).split())}") from None
        jobs += submitted
        _write_jobs(out, {**known, **{_relative_run_dir(spec, out): job.job_id for spec, job in submitted}})
        log(f"submitted {len(submitted)} run{'s' if len(submitted) > 1 else ''} to Slurm as job "
            f"{submitted[0][1].job_id.split('_')[0]}{' (an array)' if len(submitted) > 1 else ''} "
            f"(logs in {out / SUBMITIT_DIR})")
    return jobs


def _run_one_in_slurm_job(spec: RunSpec, data_cache_dir: str | None) -> dict[str, Any]:
    """:func:`run_one` with as many threads as Slurm gave the job (the submitting machine's core count means
    nothing on the node)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or "1"
    return run_one(spec, data_cache_dir, int(cpus))


def _slurm_parameters(given: dict[str, Any], parallel: int) -> dict[str, Any]:
    """submitit's parameters: the user's over the defaults. A job asks for a GPU only when the partition has GPUs,
    since a cluster without GPUs refuses ``--gpus-per-node=1`` (``--slurm gpus_per_node=N`` decides otherwise)."""
    parameters: dict[str, Any] = {"timeout_min": 24 * 60, "tasks_per_node": 1}
    for key, value in given.items():
        kind = _TYPED_PARAMETERS.get(key)
        try:
            parameters[key] = kind(value) if kind and isinstance(value, str) else value
        except ValueError:
            raise SlurmError(f"--slurm {key}={value}: {key} must be {'an integer' if kind is int else 'a number'}") \
                from None
    if parallel > 1:
        parameters.setdefault("slurm_array_parallelism", parallel)
    if "gpus_per_node" not in parameters and "slurm_gpus_per_node" not in parameters \
            and "slurm_gres" not in parameters and _partition_has_gpus(parameters.get("slurm_partition")):
        parameters["gpus_per_node"] = 1
    return parameters


def _partition_has_gpus(partition: str | None) -> bool:
    """Whether a node of ``partition`` (None: the cluster's default partition, which sinfo marks with ``*``) has
    GPUs among its generic resources."""
    if not all(shutil.which(command) for command in ("sinfo", "sbatch", "srun", "squeue")):
        raise SlurmError("--executor slurm needs Slurm's commands (sinfo, sbatch, srun, squeue) on PATH; "
                         "`bash scripts/slurm_local.sh start` starts a one-node cluster on this machine")
    command = ["sinfo", "--noheader", "--format=%P %G"] + ([f"--partition={partition}"] if partition else [])
    try:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError("sinfo got no answer from slurmctld in 60 s: is the cluster up?") from None
    if listed.returncode:
        raise SlurmError(f"sinfo failed: {' '.join(listed.stderr.split()) or listed.returncode}; is the cluster up?")
    rows = [[*line.split(maxsplit=1), ""] for line in listed.stdout.splitlines() if line.strip()]
    return any("gpu" in gres for name, gres, *_ in rows if partition or name.endswith("*"))


def _queued_slurm_jobs(job_ids: set[str]) -> set[str] | None:
    """Which of these jobs (``123`` or array tasks ``123_4``) Slurm still has pending or running; ``None`` when squeue
    cannot tell. Asked of squeue, not sacct: a cluster without accounting (the local one) has no sacct."""
    if not job_ids:
        return set()
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        listed = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(arrays)}"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode:  # squeue fails when every job asked about has left its memory
        return set() if "Invalid job id" in listed.stderr else None
    return job_ids & set(listed.stdout.split())


def _wait_for_slurm_jobs(jobs: list[tuple[RunSpec, Any]], log) -> None:
    """Report each job as it ends. A job that left the queue without a result (``scancel``, killed, out of time)
    is said so; its run directory keeps its checkpoint and the next sweep command resumes it."""
    waiting = list(jobs)
    while waiting and not stop_requested():
        # ask the queue before looking for results: a job that left it had written its result before it left
        queued = _queued_slurm_jobs({job.job_id for _, job in waiting})
        still = []
        for spec, job in waiting:
            if job.paths.result_pickle.exists():
                try:
                    result = job.result()
                    log(f"{_head(spec)}: Slurm job {job.job_id} ended without a result ({result['message']}); re-run "
                        f"the sweep to resume it" if result["status"] == "interrupted" else _describe(spec, result))
                except Exception as error:  # submitit's own failure (e.g. timed out), not a failed run
                    log(f"{_head(spec)}: Slurm job {job.job_id} failed ({error}); re-run the sweep to resume")
            elif job.job_id not in queued if queued is not None else job.done():  # no squeue: ask sacct
                log(f"{_head(spec)}: Slurm job {job.job_id} ended without a result (cancelled, killed or out of "
                    f"time; see {job.paths.stderr}); re-run the sweep to resume it")
            else:
                still.append((spec, job))
        waiting = still
        if waiting:
            time.sleep(SLURM_POLL_SECONDS)
    if waiting:  # asked to stop: the jobs go on in Slurm, and the same sweep command waits for them again
        log(f"stopped waiting for {len(waiting)} Slurm job{'s' if len(waiting) > 1 else ''}; they go on")


def _relative_run_dir(spec: RunSpec, out: Path) -> str:
    return os.path.relpath(spec.run_dir, out)


def _read_jobs(out: Path) -> dict[str, str]:
    path = out / SUBMITIT_DIR / JOBS_FILE
    return layout.read_json(path) if path.is_file() else {}


def _write_jobs(out: Path, jobs: dict[str, str]) -> None:
    layout.write_json(out / SUBMITIT_DIR / JOBS_FILE, jobs)


def _head(spec: RunSpec) -> str:
    return f"{spec.method} lr={spec.lr:g} seed={spec.seed}"


def _describe(spec: RunSpec, result: dict[str, Any]) -> str:
    head = f"{spec.method} lr={spec.lr:g} seed={spec.seed}"
    if result["status"] == "finished":
        return f"{head}: test {result['test_acc']:.2f}%"
    if result["status"] == "elsewhere":
        return f"{head}: being trained by {result['holder']}; left to it"
    if result["status"] == "diverged":
        where = result["divergence"]
        return (f"{head}: DIVERGED in epoch {where['epoch']} at step {where['step']} (training loss {where['loss']}); "
                f"kept, at chance level ({where['chance_acc']:.2f}%) in the report")
    if result["status"] == "interrupted":
        return f"{head}: {result['message']}; re-run the sweep to resume it"
    if result["status"] == "not started":
        return f"{head}: not started, the sweep was stopped; re-run the sweep to start it"
    return f"{head}: FAILED {result['error']} (see {result['run_dir']}/{layout.ERROR_FILE})"


def _write_plan(out: Path, specs: Sequence[RunSpec]) -> None:
    """Record the grid, so ``report`` knows every run that should exist (and can name the missing ones)."""
    layout.write_plan(out, [{"method": s.method, "lr": s.lr, "seed": s.seed, "recipe": s.config.recipe,
                             "dataset": s.config.dataset, "run_dir": os.path.relpath(s.run_dir, out)}
                            for s in specs])
