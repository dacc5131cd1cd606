"""The command lines of ``scripts/finetune.py``, ``scripts/compare.py``, ``scripts/study.py`` and ``scripts/export.py``.

Every project error (:class:`timm_bninit.errors.BNInitError`) is caught in one place, :func:`_one_line_errors`, and
printed as one line on stderr with exit code 2: never a traceback. A run or sweep stopped by SIGTERM or SIGINT says in
one line how to resume it and exits with 128 + the signal's number; finetune.py exits with 3 when the run diverged
(:mod:`.stopping`).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import BNInitError
from .distributed import is_main_process, launched_world_size, shared_run_dir
from .layout import ERROR_FILE, FINAL_FILE, RunError, default_run_dir, is_diverged
from .recipe import RecipeError, apply_overrides, check_config, keys_text, list_recipes, load_recipe
from .stopping import DIVERGED_EXIT_CODE, RunInterrupted, interrupted_exit_code, leaving, stop_on_signals
from .train import run_finetune

# compare.py's and study.py's modules (report, power, sweep, study) are imported where those commands start: at the
# top they would bring scipy and submitit into every finetune.py process (measured: ~60 MiB RSS, 0.6-1 s start-up)

__all__ = ["compare_main", "export_main", "finetune_main", "study_dirs", "study_main"]


def _one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Print a project error as ``error: <message>`` (one line) and return 2; with any exit code but 0, a process
    started by a launcher ignores SIGTERM while it leaves (:func:`~.stopping.leaving`)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
        except BNInitError as error:
            if is_main_process():  # every rank of an N-process job runs the same checks: say it once
                print(f"error: {error}", file=sys.stderr)
            code = 2
        if code:
            leaving(launched_world_size() > 1)  # a launcher's SIGTERM must not cut this rank's exit short
        return code

    return wrapper


def _command(script: str, argv: list[str] | None, extra: Sequence[str] = ()) -> str:
    """This command line as a user types it, with ``extra`` arguments, under the launcher of its processes."""
    launcher = ["python"]
    if launched_world_size() > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size()))
        nodes = launched_world_size() // local
        launcher = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(local)]
    args = sys.argv[1:] if argv is None else argv
    return shlex.join([*launcher, sys.argv[0] if argv is None else script, *args, *extra])


def _stopped(stop: RunInterrupted, command: str) -> int:
    """Say (once) what a signal stopped and the command that resumes it; the exit code 128 + signal."""
    leaving(launched_world_size() > 1)  # before the stop's block ends: no moment left for the launcher's SIGTERM
    if is_main_process():
        print(f"{stop}; resume with: {command}", file=sys.stderr)
    return interrupted_exit_code(stop.signum)


EXIT_CODES = (f"exit codes: 0 finished; 1 an unexpected error (a traceback); 2 a bad recipe, argument or data set (one "
              f"line, before any work); {DIVERGED_EXIT_CODE} the run diverged (a non-finite training loss stopped it; "
              f"its {FINAL_FILE} says where); 130 or 143 stopped by Ctrl-C (SIGINT) or SIGTERM at a step boundary "
              f"(128 + the signal: its last checkpoint is intact, and the line printed says how to resume)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune (or train from scratch) a timm model with a BN variant. Hyper-parameters live in a "
                    "recipe (recipes/*.yaml); any key can be overridden with --set key=value.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--recipe", default="demo",
                        help="recipe name in recipes/ or a path to a .yaml file (default: demo, offline on a CPU)")
    parser.add_argument("--data-dir", help="local data folder (official CUB/Cars archive layout or imagefolder); "
                                           "default: the recipe's, else the hub copy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set norm_layer=bn_gamma01 --set lr=0.01 (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default: a new <output-dir>/<recipe>/<method>-lr<lr>-s<seed>-"
                                          "<date>-<time>; an existing finished one is never overwritten)")
    parser.add_argument("--output-dir", default="runs", help="parent of the default run directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--data-cache-dir", help="cache for built data sets (default ~/.cache/timm_bninit)")
    parser.add_argument("--list-recipes", action="store_true", help="list the available recipes and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="list every recipe key (type, default, accepted values, what it does) and exit")
    return parser


@_one_line_errors
def finetune_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    if args.list_keys:
        print(keys_text())
        return 0
    config = apply_overrides(load_recipe(args.recipe), args.overrides + (
        [f"data_dir={args.data_dir}"] if args.data_dir else []))
    check_config(config)
    if args.resume and not args.run_dir:
        raise RunError("--resume continues the run in --run-dir; pass the run directory to resume (without --run-dir "
                       "every invocation starts a new run)")
    # without --run-dir every invocation gets a new directory (rank 0 names it for all ranks)
    run_dir = Path(args.run_dir) if args.run_dir else shared_run_dir(default_run_dir(config, args.output_dir))
    if is_main_process() and not args.quiet:
        print(f"run directory: {run_dir}")
    with stop_on_signals():  # held until the line is printed: a launcher's own SIGTERM must not cut it off
        try:
            final = run_finetune(config, run_dir, resume=args.resume, quiet=args.quiet,
                                 data_cache_dir=args.data_cache_dir)
        except RunInterrupted as stop:
            return _stopped(stop, _command("scripts/finetune.py", argv, [
                *(["--run-dir", str(run_dir)] if not args.run_dir else []), *([] if args.resume else ["--resume"])]))
    if is_diverged(final):
        where = final["divergence"]
        if is_main_process():
            print(f"{run_dir}: diverged in epoch {where['epoch']} at step {where['step']} (training loss "
                  f"{where['loss']}), so it stopped there; {FINAL_FILE} records it with every accuracy at chance level "
                  f"({where['chance_acc']:.2f}%). Try a lower lr or a warm-up", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    if is_main_process():
        print(f"{run_dir}: test accuracy {final['test_acc_at_best_val']:.2f}% at the best-validation epoch "
              f"{final['best_epoch']}, {final['test_acc_last']:.2f}% at the last epoch")
    return 0


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description="Multi-seed comparisons of BN variants: plan and run a grid of method × lr × seed (resumable), "
                    "then report mean ± std and paired t-tests against the baseline (one-sided by default).")
    commands = parser.add_subparsers(dest="command", required=True)

    def grid(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--recipe", required=True, help="recipe name or .yaml path (as for finetune.py)")
        sub.add_argument("--methods", required=True,
                         help="comma-separated: base (plain BN), a norm-layer name, or either with +key=value "
                              "overrides, e.g. base,bn_gamma01,rbn_unit,bn_gamma01+bn_transfer=reset")
        sub.add_argument("--lr", help="learning rates, e.g. 0.1,0.01 (default: the recipe's lr)")
        sub.add_argument("--seeds", default="1-15", help="seeds, e.g. 1-15 or 1,2,3 (default 1-15)")
        sub.add_argument("--out", required=True, help="sweep directory; each run is <out>/<method>/lr<lr>/seed<seed>")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="recipe override for every run of the sweep (repeatable)")
        sub.add_argument("--data-dir", help="local data folder for every run")

    run = commands.add_parser("run", help="run (or resume) every unfinished run of the grid")
    grid(run)
    run.add_argument("--parallel", type=int, default=1, help="runs side by side on this machine (cores shared)")
    run.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"],
                     help="local processes, or submitit (its local executor, or Slurm job arrays)")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="submitit Slurm parameter, e.g. --slurm slurm_partition=gpu --slurm timeout_min=600")
    run.add_argument("--retry-failed", action="store_true", help=f"re-run runs that failed ({ERROR_FILE})")
    run.add_argument("--retry-diverged", action="store_true",
                     help="re-run, from the start, runs that diverged (kept as results otherwise: docs/guide/"
                          "comparisons.md says how they enter the report)")
    run.add_argument("--data-cache-dir", help="cache for built data sets")

    status = commands.add_parser("status", help="show which runs of the grid are finished, diverged, failed, "
                                                "interrupted or pending")
    grid(status)

    report = commands.add_parser("report", help="tables (Markdown, CSV, LaTeX) and plots of a sweep")
    report.add_argument("out", help="the sweep directory")
    report.add_argument("--metric", default="best_val", choices=["best_val", "last"],
                        help="test accuracy at the best-validation epoch (default) or at the last epoch")
    report.add_argument("--baseline", default="base", help="the method every other is tested against")
    report.add_argument("--holm", action="store_true", help="Holm-correct p-values across the methods of a column")
    report.add_argument("--alternative", default="greater", choices=["greater", "two-sided"],
                        help="the paired t-test: one-sided, the method better than the baseline (default), or "
                             "two-sided, different in either direction (its MDE too, and whether each CI excludes 0)")
    report.add_argument("--labels", metavar="PATH.yaml",
                        help="readable method labels for every table and plot, a YAML file of 'method: label' lines "
                             "(the CSV keeps the method strings in its method column)")
    report.add_argument("--curves", action="store_true",
                        help="the learning-curve section and plot even for runs that recorded no loss per epoch "
                             "(default: whenever the runs recorded one)")
    report.add_argument("--report-dir", help="where to write (default <out>/report)")
    report.add_argument("--no-plots", action="store_true")

    power = commands.add_parser("power", help="plan a study from a pilot sweep: the seeds needed to detect an "
                                              "effect, and the smallest effect a design detects")
    power.add_argument("--pilot", required=True, help="a finished pilot sweep directory (the baseline and at least "
                                                      "one other method on the same two or more seeds)")
    power.add_argument("--effect", type=float, required=True,
                       help="the true mean difference to detect, in percentage points, e.g. 0.5")
    power.add_argument("--power", type=float, default=0.8, help="target power (default 0.8)")
    power.add_argument("--alpha", type=float, default=0.05, help="level of the paired t-test (default 0.05)")
    power.add_argument("--alternative", default="greater", choices=["greater", "two-sided"],
                       help="the planned test: one-sided (default) or two-sided")
    power.add_argument("--metric", default="best_val", choices=["best_val", "last"],
                       help="test accuracy at the best-validation epoch (default) or at the last epoch")
    power.add_argument("--baseline", default="base", help="the method every other is paired with")
    power.add_argument("--planned-seeds", type=int, default=15,
                       help="seeds of the planned study, for the last MDE column (default 15, the paper's)")
    return parser


@_one_line_errors
def compare_main(argv: list[str] | None = None) -> int:
    args = _compare_parser().parse_args(argv)
    from .report import pilot_plan_text, plan_from_pilot, read_labels, write_report
    from .sweep import parse_floats, parse_seeds, plan_sweep, run_sweep, sweep_status

    if args.command == "power":
        rows = plan_from_pilot(args.pilot, args.effect, alpha=args.alpha, power=args.power, metric=args.metric,
                               baseline=args.baseline, planned_seeds=args.planned_seeds, alternative=args.alternative)
        print(pilot_plan_text(rows, args.effect, alpha=args.alpha, power=args.power,
                              planned_seeds=args.planned_seeds, alternative=args.alternative))
        return 0
    if args.command == "report":
        labels = read_labels(args.labels) if args.labels else None
        for path in write_report(args.out, args.report_dir, metric=args.metric, baseline=args.baseline,
                                 use_holm=args.holm, plots=not args.no_plots, alternative=args.alternative,
                                 labels=labels, curves=True if args.curves else None):
            print(path)
        print((Path(args.report_dir or Path(args.out) / "report") / "report.md").read_text())
        return 0
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    specs = plan_sweep(args.recipe, args.methods, parse_floats(args.lr) if args.lr else None, parse_seeds(args.seeds),
                       args.out,
                       overrides)
    if args.command == "status":
        for name, items in sweep_status(specs).items():
            print(f"{name}: {len(items)}" + "".join(f"\n  {s.run_dir}" for s in items if name != "finished"))
        return 0
    bad = [item for item in args.slurm if "=" not in item]
    if bad:
        raise RecipeError(f"--slurm {bad[0]!r} is not KEY=VALUE (e.g. --slurm slurm_partition=gpu)")
    slurm = dict(item.split("=", 1) for item in args.slurm)
    with stop_on_signals():  # held until the line is printed
        try:
            final = run_sweep(specs, args.out, parallel=args.parallel, retry_failed=args.retry_failed,
                              retry_diverged=args.retry_diverged, executor=args.executor,
                              data_cache_dir=args.data_cache_dir, slurm=slurm)
        except RunInterrupted as stop:
            return _stopped(stop, _command("scripts/compare.py", argv))
    unfinished = len(final["failed"]) + len(final["pending"]) + len(final["interrupted"])
    diverged = len(final["diverged"])
    print(f"{len(final['finished']) + diverged} of {len(specs)} runs finished"
          + (f" ({diverged} diverged: kept, at chance level in the report; --retry-diverged re-runs them)"
             if diverged else "") +
          (f"; {unfinished} not: re-run the same command to resume interrupted ones, and see the {ERROR_FILE} of "
           f"failed ones (--retry-failed re-runs them)" if unfinished else ""))
    return 1 if unfinished else 0


def study_dirs(study: str, out: str | None = None, report_dir: str | None = None) -> tuple[Path, Path]:
    """Where a study's runs and reports go: ``runs/<its folder>`` (``runs/studies/v3``) and the study's folder."""
    folder = Path(study) if Path(study).is_dir() else Path(study).parent
    try:
        runs = Path("runs") / folder.resolve().relative_to(Path.cwd().resolve())
    except ValueError:  # a study folder outside the working directory
        runs = Path("runs") / folder.resolve().name
    return Path(out) if out else runs, Path(report_dir) if report_dir else folder


@_one_line_errors
def study_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="study.py",
        description="Run a reproduction study (a folder such as studies/v3: protocol.yaml, the recipes it names) and "
                    "write its tables, plots and run summaries into that folder. Running it again resumes; finished "
                    "runs are never re-run.")
    parser.add_argument("study", help="the study's folder (its protocol.yaml), or a protocol .yaml file")
    parser.add_argument("--out", help="where the runs go (default: runs/<the study's folder>, e.g. runs/studies/v3)")
    parser.add_argument("--report-dir", help="where the reports and run summaries go (default: the study's folder)")
    parser.add_argument("--parallel", type=int, default=2, help="runs side by side (default 2: one per core here)")
    parser.add_argument("--data-cache-dir", help="cache for built data sets")
    args = parser.parse_args(argv)
    from .study import run_study

    out, report_dir = study_dirs(args.study, args.out, args.report_dir)
    with stop_on_signals():  # held until the line is printed
        try:
            record = run_study(args.study, out, report_dir, parallel=args.parallel, data_cache_dir=args.data_cache_dir)
        except RunInterrupted as stop:
            return _stopped(stop, _command("scripts/study.py", argv))
    print(f"study finished in {record['wall_seconds_this_invocation'] / 60:.1f} min on {record['machine']['cores']} "
          f"cores ({record['machine']['cpu']}); reports in {report_dir}")
    return 0


@_one_line_errors
def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Write a finished run's model as a timm model folder (config.json, model.safetensors, a model "
                    "card) that timm.create_model('local-dir:OUT_DIR', pretrained=True) loads after `import "
                    "timm_bninit`; optionally push it to the Hugging Face hub.")
    parser.add_argument("run_dir", help="a finished run directory")
    parser.add_argument("out_dir", help="a new or empty folder to write")
    parser.add_argument("--which", default="best", choices=["best", "last"],
                        help="the best-validation epoch's weights (default) or the last epoch's")
    parser.add_argument("--push", metavar="REPO_ID",
                        help="then upload the folder to this hub repository (token: HF_TOKEN or a saved login)")
    parser.add_argument("--private", action="store_true", help="with --push: create the repository private")
    parser.add_argument("--license", help="the model card's licence (default: the pretrained weights', else "
                                          "apache-2.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    args = parser.parse_args(argv)
    from .export import export_run, push

    export = export_run(args.run_dir, args.out_dir, args.which, overwrite=args.overwrite, license_id=args.license,
                        repo_id=args.push)
    print(f"{export.folder}: {export.architecture} {export.model_args}, {len(export.label_names)} classes; load it "
          f'with timm.create_model("local-dir:{export.folder}", pretrained=True) after `import timm_bninit`')
    for note in export.notes:
        print(f"  {note}")
    if args.push:
        print(f"pushed: {push(export.folder, args.push, private=args.private)}")
    return 0
