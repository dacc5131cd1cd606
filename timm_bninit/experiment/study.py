"""A reproduction study in one command: a study folder (``studies/v3/``: ``protocol.yaml``, the recipes it names, its
reports) whose protocol is a set of sweeps, run resumably and reported into that folder. Each part is an ordinary
sweep (:mod:`.sweep`); a part with ``pretrain`` first trains that recipe once and fine-tunes every run of the part
from its best-validation weights.

A part may also say how it is reported: ``labels`` (method → readable label, for every table and plot) and an
``analysis`` block (``metric: best_val|last``, ``alternative: greater|two-sided``, ``holm: true|false``,
``baseline``). Without them a part is reported as every study so far was: best-validation epoch, one-sided,
Holm-corrected, against ``base``, method strings as they are."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import layout
from .layout import RunError
from .recipe import RecipeError, load_recipe
from .report import ALTERNATIVES, METRICS, check_labels, write_report
from .sweep import parse_seeds, plan_sweep, run_sweep
from .train import run_finetune

__all__ = ["load_protocol", "protocol_file", "report_options", "run_study", "ANALYSIS_DEFAULTS"]

# How a part is reported when its protocol has no analysis block: as studies v1-v3 were
ANALYSIS_DEFAULTS = {"metric": "best_val", "alternative": "greater", "holm": True, "baseline": "base"}


def protocol_file(study: str | os.PathLike) -> Path:
    """The protocol of a study: ``study`` itself when it is a file, else the ``protocol.yaml`` of that folder."""
    path = Path(study)
    return path / layout.PROTOCOL_FILE if path.is_dir() else path


def load_protocol(study: str | os.PathLike) -> dict[str, Any]:
    """A study's protocol (a folder or its protocol file), each part's ``recipe`` and ``pretrain`` resolved.

    A recipe given as a relative ``.yaml`` path is relative to the protocol file, so a study folder holds its own
    recipes and moves as a whole; a name (``demo``) is a recipe of ``recipes/``, an absolute path stays as it is.
    """
    path = protocol_file(study)
    if not path.is_file():
        raise RecipeError(f"study protocol {str(path)!r} does not exist (give a study folder holding "
                          f"{layout.PROTOCOL_FILE}, such as studies/v3, or a protocol .yaml file)")
    protocol = yaml.safe_load(path.read_text())
    if not isinstance(protocol, dict) or not isinstance(protocol.get("parts"), dict) or "seeds" not in protocol:
        raise RecipeError(f"{path}: a study protocol needs 'seeds' and a mapping 'parts' of part name -> "
                          f"recipe, lr, methods")
    for name, part in protocol["parts"].items():
        missing = {"recipe", "lr", "methods"} - set(part)
        if missing:
            raise RecipeError(f"{path}: part {name!r} lacks {', '.join(sorted(missing))}")
        for key in ("recipe", "pretrain"):
            given = Path(str(part.get(key) or ""))
            if given.suffix and not given.is_absolute():
                part[key] = str(path.parent / given)
        _check_reporting(part, f"{path}: part {name!r}")
    return protocol


def _check_reporting(part: dict[str, Any], where: str) -> None:
    """A part's ``labels`` and ``analysis``, checked when the protocol loads, before any run."""
    given = part["methods"]  # as plan_sweep reads it (a list, or one comma-separated string)
    methods = [str(m).strip() for m in (given.split(",") if isinstance(given, str) else given) if str(m).strip()]
    check_labels(part.get("labels"), methods, where=f"{where} labels")
    analysis = part.get("analysis", {})
    if not isinstance(analysis, dict):
        raise RecipeError(f"{where}: analysis must be a mapping of {', '.join(ANALYSIS_DEFAULTS)}, got {analysis!r}")
    unknown = sorted(set(analysis) - set(ANALYSIS_DEFAULTS))
    if unknown:
        raise RecipeError(f"{where}: unknown analysis key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(ANALYSIS_DEFAULTS)}")
    choices = {"metric": tuple(METRICS), "alternative": ALTERNATIVES, "holm": (True, False)}
    for key, allowed in choices.items():
        if key in analysis and (analysis[key] not in allowed or type(analysis[key]) is not type(allowed[0])):
            raise RecipeError(f"{where}: analysis {key} must be one of {', '.join(map(str, allowed))}, "
                              f"got {analysis[key]!r}")
    if "baseline" in analysis and analysis["baseline"] not in methods:
        raise RecipeError(f"{where}: analysis baseline {analysis['baseline']!r} is not one of the part's methods")


def report_options(part: dict[str, Any]) -> dict[str, Any]:
    """The :func:`.report.write_report` keywords of a (loaded) protocol part: its ``analysis`` over
    :data:`ANALYSIS_DEFAULTS`, and its ``labels``."""
    analysis = {**ANALYSIS_DEFAULTS, **part.get("analysis", {})}
    return {"metric": analysis["metric"], "alternative": analysis["alternative"], "use_holm": analysis["holm"],
            "baseline": analysis["baseline"], "labels": part.get("labels")}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _summaries(out: Path) -> list[dict[str, Any]]:
    # gamma_change only where the run recorded it, so summaries of runs from before stay as they were
    return [{"method": run["method"], "lr": run["lr"], "seed": run["seed"], "dataset": run["dataset"],
             **{k: run["final"][k] for k in ("test_acc_at_best_val", "test_acc_last", "best_epoch",
                                             "initial_effective_scale", "gamma_clamp")},
             **{k: run["final"][k] for k in ("gamma_change",) if run["final"].get(k) is not None}}
            for run in layout.sweep_runs(out)]


def run_study(protocol_path: str | os.PathLike, out: str | os.PathLike, docs: str | os.PathLike, *,
              parallel: int = 2, data_cache_dir: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) every part of a study (a folder or its protocol file), then write each part's report and run
    summaries into ``docs`` (the study's folder, from ``scripts/study.py``)."""
    protocol = load_protocol(protocol_path)
    out, docs = Path(out), Path(docs)
    seeds = parse_seeds(protocol["seeds"])
    started = time.time()
    timings: dict[str, float] = {}
    for name, part in protocol["parts"].items():
        part_started = time.time()
        overrides = []
        if part.get("pretrain"):
            pretrain_dir = out / f"{name}_pretrain"
            log(f"[{name}] pretraining {part['pretrain']} into {pretrain_dir}")
            pretrained = run_finetune(load_recipe(part["pretrain"]), pretrain_dir, resume=True, quiet=True,
                                      data_cache_dir=data_cache_dir, wait=True)  # another study command's: waited for
            if layout.is_diverged(pretrained):  # its weights are no start for anything
                raise RunError(f"[{name}] pretraining diverged ({pretrain_dir / layout.FINAL_FILE}); change its "
                               f"recipe and remove that run directory")
            overrides.append(f"pretrained_file={pretrain_dir / layout.BEST_MODEL_FILE}")
        specs = plan_sweep(part["recipe"], part["methods"], part["lr"], seeds, out / name, overrides)
        log(f"[{name}] {len(part['methods'])} methods × {len(part['lr'])} lr × {len(seeds)} seeds")
        status = run_sweep(specs, out / name, parallel=parallel, data_cache_dir=data_cache_dir,
                           log=lambda line, part_name=name: log(f"[{part_name}] {line}"))
        unfinished = len(specs) - len(status["finished"]) - len(status["diverged"])  # diverged runs are results
        if unfinished:
            raise RunError(f"[{name}] {unfinished} runs did not finish (see their {layout.ERROR_FILE}); run the study "
                               f"command again to resume them")
        timings[name] = time.time() - part_started
        report_dir = docs / name
        write_report(out / name, report_dir, **report_options(part))
        layout.write_json(report_dir / layout.SUMMARY_FILE, _summaries(out / name))
    record = {"protocol": str(protocol_path), "seeds": seeds, "parallel": parallel,
              "wall_seconds_this_invocation": time.time() - started, "part_seconds_this_invocation": timings,
              "machine": machine()}
    layout.write_json(docs / layout.STUDY_FILE, record)
    return record
