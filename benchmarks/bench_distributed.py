"""What running as 2 processes on a CPU (gloo) costs: a script, not a test (issue 12, point 8).

Three measurements, each side by side in one run, in paired rounds (every candidate once per round, in an order
shuffled per round) and reported as medians over rounds of same-round figures, so drifts of a shared machine hit
both sides of a ratio:

* **(a) BN running-statistics all-reduce per evaluation.** In a 2-process gloo job (``torch.multiprocessing``
  spawn, ``tcp://127.0.0.1``, 1 torch thread per process, an Accelerator made by the project's
  :func:`~timm_bninit.experiment.distributed.make_accelerator`), the project's
  :func:`~timm_bninit.experiment.distributed.average_bn_statistics` (timm's ``distribute_bn``: one all-reduce per
  running-mean / running-variance buffer) against one pass of the project's
  :func:`~timm_bninit.experiment.train.evaluate` over a small evaluation set split over the two ranks, same model.
  Both are timed between barriers, so a figure is the job's time (the slower rank's), not one rank's.
* **(b) ``sync_bn`` per training step.** The same 2-process job: one DDP training step (``accelerator.prepare``d
  model and SGD optimizer, cross-entropy, forward, ``accelerator.backward``, ``step``, ``zero_grad``) of the same
  model on the same per-rank batch, with and without the project's
  :func:`~timm_bninit.sync.convert_sync_batchnorm`, for plain BN (gloo: the all-reduce mixin of ``sync.py``) and RBN
  (its own synchronised statistics in ``norm.py``); the figure is the ratio synced / unsynced.
* **(c) 2 × 1 thread vs 1 × 2 threads.** Real runs of ``scripts/finetune.py`` on an imagefolder tree of JPEGs this
  script writes: ``OMP_NUM_THREADS=2 python scripts/finetune.py`` against ``OMP_NUM_THREADS=1 torchrun
  --nproc_per_node 2 scripts/finetune.py`` (and the same with ``sync_bn=true``), same recipe, same global batch.
  Their images/s is the runs' own record (``final.json``'s ``train_images_per_s``: training images over the seconds
  of the epochs' training loops, so start-up, data caching and evaluation are excluded). ``num_workers: 0``, so the
  thread counts are the whole story (no DataLoader workers competing for the two cores).

(a) and (b) run in one spawned job; (c) starts its own subprocesses afterwards, never alongside. The load average
before and after each part is printed: on a machine shared with other jobs a figure is only as good as that.

Example::

    python benchmarks/bench_distributed.py               # the run in benchmarks/HISTORY.md (~6 min)
    python benchmarks/bench_distributed.py --quick       # smoke run: test_resnet, 1 round
    python benchmarks/bench_distributed.py --one-process --rounds 10   # (b) without a peer: compute, no communication
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from timm_bninit.experiment.distributed import average_bn_statistics, make_accelerator
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.recipe import Recipe, load_recipe
from timm_bninit.experiment.train import evaluate
from timm_bninit.sync import convert_sync_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import cpu_model, write_imagefolder  # the sibling benchmark's helpers

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
NUM_CLASSES = 10


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(model: str, norm_layer: str | None, img_size: int) -> Recipe:
    return replace(load_recipe("demo"), model=model, norm_layer=norm_layer, img_size=img_size, pretrained=False,
                   drop_rate=0.0)


def timed(fn: Any, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` for the whole job: both ranks start together and the clock stops for the last."""
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    dist.barrier()
    return (time.perf_counter() - started) / repeats


def norm_buffers(model: nn.Module) -> tuple[int, int]:
    """(number of running-statistics buffers, their total elements): what ``distribute_bn`` all-reduces."""
    buffers = [b for n, b in model.named_buffers() if "running_mean" in n or "running_var" in n]
    return len(buffers), sum(b.numel() for b in buffers)


# ---- (a) and (b): one spawned 2-process gloo job ------------------------------------------------------------------


def bench_all_reduce(args: argparse.Namespace, accelerator: Any, rank: int) -> dict[str, Any]:
    """(a) ``average_bn_statistics`` against one evaluation pass, per model, in paired rounds."""
    generator = torch.Generator().manual_seed(100 + rank)
    per_rank = args.eval_images // WORLD
    images = torch.randn(per_rank, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (per_rank,), generator=generator)
    batches = list(zip(images.split(args.eval_batch // WORLD), labels.split(args.eval_batch // WORLD)))
    candidates = {}
    for model_name, norm in args.eval_models:
        torch.manual_seed(0)
        model = build_model(model_config(model_name, norm, args.img_size), NUM_CLASSES)
        model.eval()
        candidates[f"{model_name} {norm or 'bn'}"] = model
    rows: dict[str, dict[str, list[float]]] = {name: {"reduce": [], "eval": []} for name in candidates}
    for model in candidates.values():  # warm-up: first collectives and first forward are slower
        average_bn_statistics(accelerator, model)
        evaluate(model, batches[:1], accelerator)
    barrier_s = statistics.median(timed(lambda: None, 20) for _ in range(3))
    order_rng = random.Random(args.seed)  # same seed on both ranks: the same order, so the collectives match
    for _ in range(args.rounds):
        names = list(candidates)
        order_rng.shuffle(names)
        for name in names:
            model = candidates[name]
            reduce = timed(lambda m=model: average_bn_statistics(accelerator, m), args.reduce_repeats)
            rows[name]["reduce"].append(reduce)
            rows[name]["eval"].append(timed(lambda m=model: evaluate(m, batches, accelerator)))
    return {"barrier_s": barrier_s, "models": {
        name: {"buffers": norm_buffers(candidates[name]), **values} for name, values in rows.items()}}


def bench_sync_step(args: argparse.Namespace, accelerator: Any, rank: int) -> dict[str, Any]:
    """(b) one DDP training step with and without ``convert_sync_batchnorm``, per norm layer, in paired rounds."""
    generator = torch.Generator().manual_seed(200 + rank)
    images = torch.randn(args.batch_per_rank, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_per_rank,), generator=generator)
    criterion = nn.CrossEntropyLoss()
    candidates = {}
    for norm in args.step_norms:
        for sync in (False, True):
            torch.manual_seed(0)
            model = build_model(model_config(args.step_model, None if norm == "bn" else norm, args.img_size),
                                NUM_CLASSES)
            if sync:
                model = convert_sync_batchnorm(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            model, optimizer = accelerator.prepare(model, optimizer)
            model.train()
            candidates[(norm, sync)] = (model, optimizer)

    def step(model: nn.Module, optimizer: Any) -> None:
        loss = criterion(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for model, optimizer in candidates.values():
        for _ in range(args.warmup):
            step(model, optimizer)
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in candidates}
    order_rng = random.Random(args.seed + 1)
    for _ in range(args.rounds):
        keys = list(candidates)
        order_rng.shuffle(keys)
        for key in keys:
            model, optimizer = candidates[key]
            times[key].append(timed(lambda m=model, o=optimizer: step(m, o), args.steps))
    return {f"{norm} sync={sync}": values for (norm, sync), values in times.items()}


def one_process_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    """(b) in a gloo group of 1: the synced layers run their synced code, but the collectives have no peer, so what
    is left of the synced / unsynced ratio is the synced layers' own compute, not communication."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    accelerator = make_accelerator({"mixed_precision": "no", "grad_accum_steps": 1, "batch_size": args.batch_per_rank})
    results = {"load_before_b": load_average(), "b": bench_sync_step(args, accelerator, rank)}
    results["load_after_b"] = load_average()
    Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecation note on dist.nn, once per layer
    accelerator = make_accelerator({"mixed_precision": "no", "grad_accum_steps": 1,
                                    "batch_size": WORLD * args.batch_per_rank})
    assert accelerator.num_processes == WORLD and dist.get_backend() == "gloo"
    results = {"load_before_a": load_average()}
    results["a"] = bench_all_reduce(args, accelerator, rank)
    results["load_before_b"] = load_average()
    results["b"] = bench_sync_step(args, accelerator, rank)
    results["load_after_b"] = load_average()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ---- (c): real runs of scripts/finetune.py -------------------------------------------------------------------------


def write_recipe(args: argparse.Namespace, work: Path) -> Path:
    folder = work / "folder"
    # train_steps global batches after the 10 % validation split, plus a small test split
    num_train = max(int(args.run_steps * args.run_batch / 0.9) + NUM_CLASSES, 11 * NUM_CLASSES)
    write_imagefolder(folder, num_train, 4 * NUM_CLASSES, NUM_CLASSES, args.source_size)
    config = replace(load_recipe("demo"), dataset="imagefolder", data_dir=str(folder), model=args.step_model,
                     norm_layer=None, img_size=args.img_size, epochs=args.run_epochs, batch_size=args.run_batch,
                     num_workers=0, precise_bn_batches=0, val_fraction=0.1, augmentation="flip", preload=False,
                     pretrained=False, sync_bn=False)
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    return path


def run_candidate(name: str, recipe: Path, run_dir: Path, cache: Path) -> dict[str, Any]:
    processes, threads, sync = {"1 x 2 threads": (1, 2, False), "2 x 1 thread": (2, 1, False),
                                "2 x 1 thread, sync_bn": (2, 1, True)}[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "--master_port", str(free_port())]
    command = [*launcher, str(ROOT / "scripts" / "finetune.py"), "--recipe", str(recipe), "--run-dir", str(run_dir),
               "--data-cache-dir", str(cache), "--quiet", "--set", f"sync_bn={str(sync).lower()}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"error: {name} failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[:3000]}")
    final = json.loads((run_dir / "final.json").read_text())
    environment = final["environment"]
    assert environment["num_processes"] == processes and environment["cpu_threads"] == threads, environment
    return {"images_per_s": final["train_images_per_s"], "updates": final["num_updates"]}


def bench_runs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    recipe = write_recipe(args, work)
    names = ["1 x 2 threads", "2 x 1 thread", "2 x 1 thread, sync_bn"]
    rows: dict[str, list[float]] = {name: [] for name in names}
    updates: dict[str, int] = {}
    order_rng = random.Random(args.seed + 2)
    for index in range(args.run_rounds):
        order_rng.shuffle(names)
        for name in names:
            result = run_candidate(name, recipe, work / f"run{index}-{len(rows[name])}-{name[:1]}{name[-1]}",
                                   work / "cache")
            rows[name].append(result["images_per_s"])
            updates[name] = result["updates"]
            print(f"  (c) round {index + 1}: {name:24s} {result['images_per_s']:7.2f} img/s", flush=True)
    return {"images_per_s": rows, "updates": updates}


# ---- report --------------------------------------------------------------------------------------------------------


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def report_steps(args: argparse.Namespace, ab: dict[str, Any], processes: int) -> None:
    b = ab["b"]
    print(f"\n(b) one {'DDP ' if processes > 1 else ''}training step, {args.step_model} at {args.img_size} px, batch "
          f"{args.batch_per_rank} per rank, {processes} process{'es' if processes > 1 else ''} x 1 thread, gloo"
          f"{'' if processes > 1 else ' group of 1 (no peer)'}; {args.steps} steps per candidate per round, "
          f"{args.rounds} rounds; load average before: {ab['load_before_b']}, after: {ab['load_after_b']}")
    print(f"{'norm':8s} {'no sync ms/step':>16s} {'sync_bn ms/step':>16s} {'sync / no sync':>15s} {'(range)':>16s}")
    for norm in args.step_norms:
        plain, synced = b[f"{norm} sync=False"], b[f"{norm} sync=True"]
        ratios = [s / p for s, p in zip(synced, plain)]
        print(f"{norm:8s} {1e3 * statistics.median(plain):16.1f} {1e3 * statistics.median(synced):16.1f} "
              f"{statistics.median(ratios):15.3f} {f'[{min(ratios):.3f}-{max(ratios):.3f}]':>16s}")


def report(args: argparse.Namespace, ab: dict[str, Any], c: dict[str, Any] | None) -> None:
    a = ab["a"]
    print(f"\n(a) BN running-statistics all-reduce (average_bn_statistics) vs one evaluation pass; 2 processes x "
          f"1 thread, gloo; eval set {args.eval_images} images at {args.img_size} px (batch {args.eval_batch} "
          f"global); {args.rounds} rounds; load average before: {ab['load_before_a']}")
    print(f"    an empty barrier pair, the floor of every figure: {1e3 * a['barrier_s']:.3f} ms")
    print(f"{'model':18s} {'buffers':>8s} {'elements':>9s} {'all-reduce ms':>14s} {'eval pass ms':>13s} "
          f"{'reduce / eval':>14s}")
    for name, row in a["models"].items():
        count, elements = row["buffers"]
        print(f"{name:18s} {count:8d} {elements:9d} {1e3 * statistics.median(row['reduce']):14.2f} "
              f"{1e3 * statistics.median(row['eval']):13.1f} {median_ratio(row['reduce'], row['eval']):14.4f}")
    report_steps(args, ab, WORLD)
    if c is None:
        return
    rows = c["images_per_s"]
    base = rows["1 x 2 threads"]
    print(f"\n(c) scripts/finetune.py, {args.step_model} BN at {args.img_size} px, global batch {args.run_batch}, "
          f"{args.run_epochs} epochs, num_workers 0; {args.run_rounds} rounds; train_images_per_s from final.json")
    print(f"{'candidate':24s} {'updates':>8s} {'img/s (median)':>15s} {'(range)':>16s} {'/ 1 x 2 threads':>16s}")
    for name in ("1 x 2 threads", "2 x 1 thread", "2 x 1 thread, sync_bn"):
        values = rows[name]
        print(f"{name:24s} {c['updates'][name]:8d} {statistics.median(values):15.2f} "
              f"{f'[{min(values):.1f}-{max(values):.1f}]':>16s} {median_ratio(values, base):16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--eval-images", type=int, default=128, help="evaluation set, both ranks together")
    parser.add_argument("--eval-batch", type=int, default=64, help="global evaluation batch")
    parser.add_argument("--reduce-repeats", type=int, default=5, help="all-reduces timed per round and model")
    parser.add_argument("--step-model", default="resnet18")
    parser.add_argument("--step-norms", nargs="+", default=["bn", "rbn"], help="norm layers for (b)")
    parser.add_argument("--batch-per-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="training steps per candidate per round in (b)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of (a) and (b)")
    parser.add_argument("--run-rounds", type=int, default=3, help="paired rounds of (c)")
    parser.add_argument("--run-batch", type=int, default=32, help="global batch of (c)")
    parser.add_argument("--run-steps", type=int, default=6, help="updates per epoch in (c)")
    parser.add_argument("--run-epochs", type=int, default=2)
    parser.add_argument("--source-size", type=int, default=96, help="side of the generated JPEGs")
    parser.add_argument("--skip-runs", action="store_true", help="only (a) and (b)")
    parser.add_argument("--one-process", action="store_true",
                        help="only (b), in a gloo group of 1 process: the synced layers' compute without communication")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: test_resnet, 32 px, 1 round")
    args = parser.parse_args()
    args.eval_models = [("resnet18", None), ("resnet50", None), ("resnet50", "rbn")]
    if args.quick:
        args.img_size, args.rounds, args.run_rounds, args.steps, args.warmup = 32, 1, 1, 1, 1
        args.eval_models, args.step_model = [("test_resnet", None), ("test_resnet", "rbn")], "test_resnet"
        args.run_steps, args.run_epochs = 2, 1
        args.eval_images, args.eval_batch, args.batch_per_rank, args.run_batch = 16, 8, 4, 8
    started = time.perf_counter()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}; "
          f"load average before: {load_average()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        out = work / "ab.json"
        if args.one_process:
            mp.spawn(one_process_worker, args=(free_port(), args, str(out)), nprocs=1, join=True)
            report_steps(args, json.loads(out.read_text()), 1)
            return
        mp.spawn(worker, args=(free_port(), args, str(out)), nprocs=WORLD, join=True)
        ab = json.loads(out.read_text())
        print(f"(a), (b) done after {time.perf_counter() - started:.0f} s", flush=True)
        c = None if args.skip_runs else bench_runs(args, work)
        report(args, ab, c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average after: {load_average()}; wall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
