"""The sweep: plan a grid of recipe × method × lr × seed and run it resumably (comparing is :mod:`.report`'s job).

Every cell of the grid is an ordinary run directory (:func:`.layout.sweep_run_dir`). Running a sweep
again never re-runs or overwrites a finished run (``final.json``), resumes interrupted ones from their checkpoint,
and re-tries failed ones (``error.json``) only when asked.

A method is ``base`` (plain BN, γ0 = 1, c = 1: the paper's BASE), a registered norm-layer name (``bn_gamma01``), or
either followed by recipe overrides: ``bn_gamma01+bn_transfer=reset``, ``base+gamma_lr_div=100``.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..registry import resolve_norm_layer
from . import layout
from .recipe import RecipeError, apply_overrides, check_config, load_recipe
from .train import run_finetune

__all__ = ["RunSpec", "parse_methods", "parse_seeds", "parse_floats", "plan_sweep", "run_sweep", "sweep_status"]


@dataclass(frozen=True)
class RunSpec:
    """One cell of a sweep: the resolved config and where it runs."""

    method: str
    lr: float
    seed: int
    run_dir: str
    config: dict[str, Any]


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

    Every cell's configuration is checked here, before any run starts; ``lrs`` None or empty: the recipe's lr.
    """
    base = apply_overrides(load_recipe(recipe), overrides)
    specs = []
    for method, method_overrides in parse_methods(methods).items():
        for lr in lrs or [base["lr"]]:
            for seed in seeds:
                config = apply_overrides(base, [*method_overrides, f"lr={lr!r}", f"seed={seed}"])
                check_config(config)
                run_dir = layout.sweep_run_dir(out, method, lr, seed)
                specs.append(RunSpec(method, float(lr), int(seed), str(run_dir), config))
    return specs


def sweep_status(specs: Sequence[RunSpec]) -> dict[str, list[RunSpec]]:
    status: dict[str, list[RunSpec]] = {"finished": [], "failed": [], "interrupted": [], "pending": []}
    for spec in specs:
        status[layout.run_status(spec.run_dir)].append(spec)
    return status


def run_one(spec: RunSpec, data_cache_dir: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) one cell; a failure is recorded in ``error.json`` instead of stopping the sweep."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(spec.run_dir)
    try:
        final = run_finetune(spec.config, run_dir, resume=True, quiet=True, data_cache_dir=data_cache_dir)
    except Exception as error:  # a sweep records the failure and goes on
        layout.write_error(run_dir, {"method": spec.method, "lr": spec.lr, "seed": spec.seed,
                                     "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        return {"status": "failed", "run_dir": str(run_dir), "error": f"{type(error).__name__}: {error}"}
    layout.clear_error(run_dir)
    return {"status": "finished", "run_dir": str(run_dir), "test_acc": final["test_acc_at_best_val"]}


def run_sweep(specs: Sequence[RunSpec], out: str | os.PathLike, *, parallel: int = 1, retry_failed: bool = False,
              executor: str = "local", data_cache_dir: str | None = None, slurm: dict[str, Any] | None = None,
              log=print) -> dict[str, list[RunSpec]]:
    """Run every unfinished cell: ``local`` (``parallel`` runs side by side on this machine's cores) or through
    submitit (``submitit-local`` on this machine, ``slurm`` on a cluster). Returns the final status."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, specs)
    status = sweep_status(specs)
    todo = status["interrupted"] + status["pending"] + (status["failed"] if retry_failed else [])
    log(f"{len(specs)} runs: {len(status['finished'])} finished, {len(status['interrupted'])} to resume, "
        f"{len(status['pending'])} to start, {len(status['failed'])} failed"
        + (" (re-trying)" if retry_failed and status["failed"] else
           " (kept; --retry-failed re-runs them)" if status["failed"] else ""))
    if retry_failed:
        for spec in status["failed"]:
            layout.clear_error(spec.run_dir)
    if not todo:
        return sweep_status(specs)
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(parallel, 1))
    if executor == "local" and parallel <= 1:
        for spec in todo:
            log(_describe(spec, run_one(spec, data_cache_dir)))
    elif executor == "local":
        # one process per run: isolates failures and keeps each run's threads to its share of the cores
        with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, spec, data_cache_dir, threads): spec for spec in todo}
            for future in as_completed(futures):
                log(_describe(futures[future], future.result()))
    elif executor in ("submitit-local", "slurm"):
        _run_submitit(todo, out, executor, parallel, threads, data_cache_dir, slurm or {}, log)
    else:
        raise RecipeError(f"unknown executor {executor!r}; choose local, submitit-local or slurm")
    return sweep_status(specs)


def _run_submitit(todo: Sequence[RunSpec], out: Path, executor: str, parallel: int, threads: int,
                  data_cache_dir: str | None, slurm: dict[str, Any], log) -> None:
    import submitit

    folder = out / "submitit" / "%j"
    if executor == "slurm":
        runner = submitit.AutoExecutor(folder=folder, cluster="slurm")
        runner.update_parameters(**{"timeout_min": 24 * 60, "gpus_per_node": 1, "tasks_per_node": 1, **slurm})
    else:
        runner = submitit.LocalExecutor(folder=folder)
        runner.update_parameters(timeout_min=24 * 60, visible_gpus=())
    jobs = []
    with runner.batch():  # a job array on Slurm
        for spec in todo:
            jobs.append((spec, runner.submit(run_one, spec, data_cache_dir, threads)))
    for spec, job in jobs:
        try:
            log(_describe(spec, job.result()))
        except Exception as error:  # the job itself died (killed, out of time): the run resumes next time
            log(f"{spec.method} lr={spec.lr:g} seed={spec.seed}: job failed ({error}); re-run the sweep to resume")


def _describe(spec: RunSpec, result: dict[str, Any]) -> str:
    head = f"{spec.method} lr={spec.lr:g} seed={spec.seed}"
    if result["status"] == "finished":
        return f"{head}: test {result['test_acc']:.2f}%"
    return f"{head}: FAILED {result['error']} (see {result['run_dir']}/{layout.ERROR_FILE})"


def _write_plan(out: Path, specs: Sequence[RunSpec]) -> None:
    """Record the grid, so ``report`` knows every run that should exist (and can name the missing ones)."""
    layout.write_plan(out, [{"method": s.method, "lr": s.lr, "seed": s.seed, "recipe": s.config["recipe"],
                             "dataset": s.config["dataset"], "run_dir": os.path.relpath(s.run_dir, out)}
                            for s in specs])
