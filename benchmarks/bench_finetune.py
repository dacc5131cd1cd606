"""Training throughput of the fine-tuning pipeline against a bare PyTorch loop (a script, not a test).

Compared side by side in one run, on the same model (same norm variant), optimizer, batch size, image size and
number of optimisation steps, with the same torch thread count in the training process:

* **pipeline**: :func:`timm_bninit.experiment.train.run_finetune` on an imagefolder tree of JPEGs this script writes
  into a temporary folder (so every step decodes and augments real files), at each ``num_workers`` asked for. Its
  images/s is the one the run itself records: training images over the seconds of the epochs' training loops
  (``metrics.jsonl`` per epoch, ``final.json`` overall), which exclude evaluation and checkpointing.
* **bare loop** (the ceiling): the same model and optimizer, built by the same package functions, stepping over
  tensors that were decoded and transformed once beforehand and sit in memory; no DataLoader, accelerate,
  scheduler, progress bar or loss bookkeeping.
* **timm's train.py** would be the third candidate, but it is not in timm's PyPI distributions (neither the wheel
  nor the sdist ship it) and nothing but PyPI is reachable here, so it is reported as not measured.

Each round runs every candidate once, in a freshly shuffled order, each from a fresh model, for the same number of
epochs; a candidate's ratio is the median over rounds of (its images/s / the bare loop's images/s in that round), so
slow drifts of the machine hit all of them alike. Two throughputs are reported per candidate: the run record (all
training-loop time, epoch start-up and the first step included) and the median step (the median gap between two
training forwards, stamped by a forward pre-hook on the model; robust to bursts of load).

On a shared machine a burst of load from other processes during one candidate skews its round (with 2 torch threads
on 2 cores, one busy core slows a step several-fold). The script therefore measures, per candidate, how many cores
other processes kept busy (``/proc/stat`` minus this process and its DataLoader workers); a round where that exceeds
``--max-other-load`` during any candidate is printed but left out of the medians, and rounds are added until
``--rounds`` clean ones are in (at most ``--max-rounds``).

The data pipeline alone (data set + transform through a DataLoader, no model) is also timed with 0 and 1 workers,
with a breakdown of decode, transform and the per-sample seeding.

``--compile`` measures something else: when ``compile: true`` pays. The pipeline runs eager and compiled (recipe key
``compile``, inductor), paired in shuffled rounds, for ``--epochs`` epochs (at least 3); from each run's
``metrics.jsonl`` and ``final.json`` it reports the steady step time (epochs after the first), the compile time of the
training graph (the first epoch's excess over a steady one, beyond eager's own first-epoch excess), the whole run's
extra wall time (evaluation's compiled graphs included) and the number of updates after which compiling has paid for
itself. Before every compiled run torch's in-process compile cache is reset, as a new process starts; inductor's
on-disk cache is not, so the first round compiles cold (unless an earlier run left the same graphs) and later rounds
show what a second run of a sweep pays.

Example::

    python benchmarks/bench_finetune.py                 # resnet18, 64 px, batch 32, 10 steps x 2 epochs, 3 rounds
    python benchmarks/bench_finetune.py --steps 8 --rounds 5   # the run in benchmarks/HISTORY.md
    python benchmarks/bench_finetune.py --workers 0 2 --threads 2
    python benchmarks/bench_finetune.py --quick         # smoke run: test_resnet, 1 round
    python benchmarks/bench_finetune.py --compile --workers 0 --epochs 4 --rounds 2 --norm-layer rbn
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from timm_bninit.data import load_image_dataset
from timm_bninit.experiment import train as finetune
from timm_bninit.experiment.loaders import EpochShuffleSampler, SeededImageDataset, build_transforms
from timm_bninit.experiment.recipe import Recipe, load_recipe
from timm_bninit.experiment.seeding import rng_scope, seed_for
from timm_bninit.experiment.train import run_finetune

PIPELINE_TARGET = 0.9  # the target: pipeline images/s ≥ 0.9 × the bare loop's
TIMM_TRAIN_PY = ("not measured: timm's train.py is not shipped in timm's PyPI wheel or sdist (checked with "
                 "`pip download timm --no-deps`), and only PyPI is reachable here")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_imagefolder(root: Path, num_train: int, num_test: int, num_classes: int, size: int) -> None:
    """JPEGs with smooth, photo-like content (upsampled random fields plus grain), so decoding costs what it would."""
    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            label = index % num_classes
            field = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size),
                                                                                           Image.Resampling.BICUBIC)
            pixels = np.asarray(field, dtype=np.float32) * 0.7 + 70 * np.eye(3)[label % 3]
            pixels += rng.normal(0, 8, pixels.shape)
            path = root / split / f"class{label}" / f"{index:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


# ---- the data pipeline alone ---------------------------------------------------------------------------------------


def loader_images_per_s(dataset: Any, batch_size: int, workers: int, seed: int, passes: int) -> float:
    """Steady-state images/s of iterating ``dataset`` through a DataLoader (clock starts after the first batch)."""
    sampler = EpochShuffleSampler(len(dataset), seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    images, start = 0, None
    for epoch in range(passes):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        for batch, _ in loader:
            if start is None:
                start = time.perf_counter()  # worker start-up and the first batch excluded
                continue
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


class _DecodeOnly:
    def __init__(self, rows: Any):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        row["image"].convert("RGB")
        return torch.zeros(1), row["label"]


def measure_data_pipeline(rows: Any, transform: Any, batch_size: int, seed: int, passes: int,
                          repeats: int) -> list[tuple[str, float]]:
    """``(what, median images/s over repeats)`` of the training data set alone, each layer's cost split out."""
    seeded = SeededImageDataset(rows, transform, seed)
    settings = [
        ("decode only (datasets row + RGB), 0 workers", _DecodeOnly(rows), 0),
        ("decode + transform, no rng_scope, 0 workers", SeededImageDataset(rows, transform, None), 0),
        ("pipeline data set (+ rng_scope), 0 workers", seeded, 0),
        ("pipeline data set (+ rng_scope), 1 worker", seeded, 1),
    ]
    rates: dict[str, list[float]] = {what: [] for what, _, _ in settings}
    for _ in range(repeats):  # interleaved, so a burst of load does not hit one setting only
        for what, dataset, workers in settings:
            rates[what].append(loader_images_per_s(dataset, batch_size, workers, seed, passes))
    return [(what, statistics.median(values)) for what, values in rates.items()]


def rng_scope_microseconds(repeats: int = 2000) -> float:
    start = time.perf_counter()
    for index in range(repeats):
        with rng_scope(seed_for(1, "augment", 0, index)):
            pass
    return (time.perf_counter() - start) / repeats * 1e6


# ---- the candidates ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def step_clock() -> Iterator[list[float]]:
    """Stamp the start of every training-mode forward of the models :func:`build_model` builds meanwhile.

    Both candidates build their model with it, so the same clock times the pipeline's loop (inside
    ``run_finetune``) and the bare loop: the gap between two stamps is one optimisation step plus fetching the next
    batch. Evaluation forwards (eval mode) are not stamped.
    """
    stamps: list[float] = []
    original = finetune.build_model

    def stamp(module: nn.Module, inputs: Any) -> None:
        if module.training:
            stamps.append(time.perf_counter())

    def build_and_stamp(*args: Any, **kwargs: Any) -> nn.Module:
        model = original(*args, **kwargs)
        model.register_forward_pre_hook(stamp)
        return model

    finetune.build_model = build_and_stamp
    try:
        yield stamps
    finally:
        finetune.build_model = original


def steady_images_per_s(stamps: list[float], steps: int, epochs: int, batch_size: int) -> float:
    """Images/s of the median step, from the gaps between stamps within an epoch (robust to bursts of load)."""
    if len(stamps) != steps * epochs:
        raise RuntimeError(f"expected {steps * epochs} training forwards, stamped {len(stamps)}")
    gaps = [later - earlier for epoch in range(epochs)
            for earlier, later in itertools.pairwise(stamps[epoch * steps:(epoch + 1) * steps])]
    return batch_size / statistics.median(gaps)


def cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process and its reaped children)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, own


def other_load(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """Cores kept busy by other processes meanwhile: what makes a measurement on a shared machine noisy."""
    if before is None or after is None:
        return None
    wall, busy, own = (a - b for a, b in zip(after, before))
    return max(busy - own, 0.0) / wall


def run_pipeline(config: Recipe, run_dir: Path, cache: Path) -> dict[str, Any]:
    """The pipeline, its images/s read from the run's own ``metrics.jsonl`` and ``final.json``."""
    with step_clock() as stamps:
        final = run_finetune(config, run_dir, quiet=True, data_cache_dir=cache)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"images_per_s": final["train_images_per_s"], "epochs": [m["images_per_s"] for m in metrics],
            "stamps": stamps, "threads": final["environment"]["cpu_threads"]}


def run_bare_loop(config: Recipe, num_classes: int, images: torch.Tensor, labels: torch.Tensor,
                  steps: int) -> dict[str, Any]:
    """The ceiling: the pipeline's model and optimizer, stepping over tensors already in memory."""
    from timm_bninit.experiment.train import build_optimizer, laid_out

    with step_clock() as stamps:
        model = laid_out(config, finetune.build_model(config, num_classes))  # as build_run lays the model out
    optimizer = build_optimizer(config, model)  # the run's (fused where torch has a kernel)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    sampler = EpochShuffleSampler(len(images), config.seed)
    batch = config.batch_size
    model.train()
    per_epoch, total_seconds = [], 0.0
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * batch:(step + 1) * batch]
            loss = criterion(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        total_seconds += seconds
        per_epoch.append(steps * batch / seconds)
    return {"images_per_s": steps * batch * config.epochs / total_seconds, "epochs": per_epoch,
            "stamps": stamps, "threads": torch.get_num_threads()}


# ---- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--norm-layer", default="bn_gamma01", help="norm variant (default bn_gamma01; 'none': BN)")
    parser.add_argument("--img-size", type=int, default=64, help="training image size (default 64)")
    parser.add_argument("--source-size", type=int, default=96, help="side of the generated JPEGs (default 96)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per epoch (default 10)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per candidate per round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="clean rounds of every candidate wanted (default 3)")
    parser.add_argument("--max-rounds", type=int, default=None, help="give up after this many rounds (default 2x)")
    parser.add_argument("--max-other-load", type=float, default=0.2,
                        help="a round in which other processes kept more cores than this busy during any candidate "
                             "is reported but left out of the medians (default 0.2; a negative value keeps all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="pipeline num_workers settings to compare (default 0 1 2)")
    parser.add_argument("--augmentation", default="rrc", choices=("rrc", "flip", "none"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--compile", action="store_true",
                        help="instead: the pipeline eager against compile: true (at the first --workers setting): "
                             "compile time against the per-step gain")
    parser.add_argument("--quick", action="store_true", help="smoke run: test_resnet, 32 px, 3 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.model, args.img_size, args.source_size, args.steps, args.rounds = "test_resnet", 32, 48, 3, 1
        args.batch_size = min(args.batch_size, 8)
    args.max_rounds = args.max_rounds or 2 * args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()  # the one-off cache build would otherwise print bars between the results
    threads = torch.get_num_threads()

    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        benchmark(args, threads, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def benchmark(args: argparse.Namespace, threads: int, work: Path) -> None:
    started = time.perf_counter()
    folder, cache = work / "images", work / "cache"
    num_classes, num_train = 10, args.steps * args.batch_size
    write_imagefolder(folder, num_train, max(2 * num_classes, args.batch_size), num_classes, args.source_size)
    data, info = load_image_dataset("imagefolder", data_dir=folder, cache_dir=cache, val_fraction=0)
    prepared = time.perf_counter() - started

    config = replace(load_recipe("demo"), dataset="imagefolder", data_dir=str(folder), model=args.model,
                     img_size=args.img_size, batch_size=args.batch_size, epochs=args.epochs, val_fraction=0.0,
                     precise_bn_batches=0, augmentation=args.augmentation,
                     norm_layer=None if args.norm_layer == "none" else args.norm_layer)
    model = finetune.build_model(config, info.num_classes)
    train_transform, _ = build_transforms(config, model)
    del model

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}; training process: "
          f"{threads} torch threads (DataLoader workers: 1 thread each)")
    print(f"{args.model} ({config.norm_layer or 'BN'}), {config.optimizer}, batch {args.batch_size}, "
          f"{args.img_size} px ({args.augmentation} from {args.source_size} px JPEGs), {args.steps} steps x "
          f"{args.epochs} epochs per candidate, {args.rounds} clean rounds wanted (at most {args.max_rounds}), "
          f"shuffled order")
    print(f"{num_train} training JPEGs written and cached in {prepared:.1f} s under {work}\n", flush=True)
    if args.compile:
        compare_compiled(args, config, work, cache)
        return

    data_rows = measure_data_pipeline(data["train"], train_transform, args.batch_size, config.seed,
                                      passes=1 if args.quick else 2, repeats=1 if args.quick else 3)

    # the ceiling's tensors: epoch 0's augmented images, exactly those the pipeline's first epoch sees
    seeded = SeededImageDataset(data["train"], train_transform, config.seed)
    samples = [seeded[i] for i in range(len(seeded))]
    images = torch.stack([image for image, _ in samples]).contiguous()
    labels = torch.tensor([label for _, label in samples])

    candidates = ["bare", *(f"pipeline-w{w}" for w in args.workers)]
    rounds: list[dict[str, dict[str, Any]]] = []
    order_rng = random.Random(0)
    while sum(clean(r, args.max_other_load) for r in rounds) < args.rounds and len(rounds) < args.max_rounds:
        this_round: dict[str, dict[str, Any]] = {}
        for name in order_rng.sample(candidates, len(candidates)):
            before = cpu_seconds()
            if name == "bare":
                result = run_bare_loop(config, info.num_classes, images, labels, args.steps)
            else:
                run_config = replace(config, num_workers=int(name.removeprefix("pipeline-w")))
                result = run_pipeline(run_config, work / "runs" / f"{name}-r{len(rounds)}", cache)
            result["other_load"] = other_load(before, cpu_seconds())
            if result["threads"] != threads:
                raise RuntimeError(f"{name} ran with {result['threads']} torch threads, expected {threads}")
            result["steady"] = steady_images_per_s(result["stamps"], args.steps, args.epochs, args.batch_size)
            this_round[name] = result
            load_text = "" if result["other_load"] is None else f"; other processes: {result['other_load']:.2f} cores"
            epochs_text = ", ".join(f"{v:.1f}" for v in result["epochs"])
            print(f"  round {len(rounds) + 1}: {label_of(name):<24} {result['images_per_s']:6.2f} img/s over its "
                  f"epochs ({epochs_text}), median step {result['steady']:6.2f} img/s{load_text}", flush=True)
        rounds.append(this_round)
        if not clean(this_round, args.max_other_load):
            print(f"  round {len(rounds)} left out: other processes were busy (> {args.max_other_load} cores)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")

    print("Data pipeline alone (steady state, first batch excluded; median of the repeats):")
    for what, rate in data_rows:
        print(f"  {what:<56} {rate:8.0f} img/s")
    print(f"  {'rng_scope + seed_for alone':<56} {rng_scope_microseconds():8.0f} µs per sample")
    kept = [r for r in rounds if clean(r, args.max_other_load)] or rounds
    step_seconds = args.batch_size / statistics.median(r["bare"]["steady"] for r in kept)
    print(f"  (a bare training step of {args.batch_size} images: {step_seconds * 1000:.0f} ms; loading its batch in "
          f"the main process: {args.batch_size / data_rows[2][1] * 1000:.0f} ms)\n")

    if not any(clean(r, args.max_other_load) for r in rounds):
        print(f"WARNING: no round was clean (other processes busy > {args.max_other_load} cores); all rounds used")
    print_table(kept, candidates, len(rounds), threads)
    print(f"\nWall time of the benchmark: {time.perf_counter() - started:.0f} s")


# ---- compile: true against eager -----------------------------------------------------------------------------------


def run_record(config: Recipe, run_dir: Path, cache: Path, steps: int) -> dict[str, float]:
    """One run's figures from its ``metrics.jsonl`` and ``final.json``: the first epoch's seconds, the steady step
    (median over the later epochs), and the whole run's wall time (training, evaluation and checkpoints)."""
    if config.compile:
        torch._dynamo.reset()  # compile as a new process would (inductor's on-disk cache stays)
    started = time.perf_counter()
    final = run_finetune(config, run_dir, quiet=True, data_cache_dir=cache)
    wall = time.perf_counter() - started
    seconds = [json.loads(line)["epoch_seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = statistics.median(seconds[1:])
    return {"first_epoch": seconds[0], "steady_epoch": steady, "step": steady / steps, "wall": wall,
            "test_acc": final["test_acc_last"]}


def compare_compiled(args: argparse.Namespace, config: Recipe, work: Path, cache: Path) -> None:
    """Eager against ``compile: true``, paired rounds in shuffled order: step time, compile time, break-even."""
    config = replace(config, num_workers=args.workers[0], epochs=max(args.epochs, 3))
    order_rng, rounds = random.Random(0), []
    for index in range(args.rounds):
        this_round = {}
        for compiled in order_rng.sample([False, True], 2):
            name = f"{'compiled' if compiled else 'eager'}-r{index}"
            this_round[compiled] = run_record(replace(config, compile=compiled), work / "runs" / name, cache,
                                              args.steps)
            record = this_round[compiled]
            print(f"  round {index + 1}: {name.split('-')[0]:<9} first epoch {record['first_epoch']:7.1f} s, steady "
                  f"step {record['step'] * 1000:7.1f} ms, whole run {record['wall']:7.1f} s", flush=True)
        rounds.append(this_round)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    header = (f"{'round':<7}{'eager step ms':>14}{'compiled step ms':>18}{'ratio':>7}{'compile s (train)':>19}"
              f"{'extra wall s':>14}{'break-even updates':>20}")
    print(header)
    print("-" * len(header))
    for index, pair in enumerate(rounds):
        eager, compiled = pair[False], pair[True]
        train_compile = (compiled["first_epoch"] - compiled["steady_epoch"]) - (eager["first_epoch"] -
                                                                                 eager["steady_epoch"])
        gain = eager["step"] - compiled["step"]
        updates = config.epochs * args.steps
        overhead = compiled["wall"] - eager["wall"] + updates * gain  # all the run's extra time but the steps' gain
        even = f"{overhead / gain:,.0f}" if gain > 0 else "never (no gain)"
        print(f"{index + 1:<7}{eager['step'] * 1000:>14.1f}{compiled['step'] * 1000:>18.1f}"
              f"{compiled['step'] / eager['step']:>7.3f}{train_compile:>19.1f}{compiled['wall'] - eager['wall']:>14.1f}"
              f"{even:>20}")
    print(f"\n{config.model} ({config.norm_layer or 'BN'}), batch {config.batch_size}, {config.img_size} px, "
          f"{args.steps} steps x {config.epochs} epochs, num_workers={config.num_workers}, inductor, mode default. "
          f"'compile s (train)': the training graph's compile time; 'extra wall s': compiled run - eager run, "
          f"evaluation's graphs included; 'break-even updates': (extra wall + updates x step gain) / step gain.")


def clean(round_results: dict[str, dict[str, Any]], max_other_load: float) -> bool:
    loads = [r["other_load"] for r in round_results.values()]
    return max_other_load < 0 or all(load is None or load <= max_other_load for load in loads)


def label_of(name: str) -> str:
    return "bare loop (ceiling)" if name == "bare" else name.replace("-w", ", num_workers=")


def print_table(rounds: list[dict[str, dict[str, Any]]], candidates: list[str], run: int, threads: int) -> None:
    """Medians over the kept rounds; a ratio is the median over them of (candidate / bare loop in the same round)."""
    def values(name: str, key: str) -> list[float]:
        return [r[name][key] for r in rounds]

    def ratio(name: str, key: str) -> float:
        return statistics.median(r[name][key] / r["bare"][key] for r in rounds)

    header = (f"{'candidate':<24}{'img/s (run record)':>20}{'ratio':>8}{'img/s (median step)':>21}{'ratio':>8}"
              f"  target: ≥ {PIPELINE_TARGET}× bare")
    print(header)
    print("-" * len(header))
    for name in candidates:
        rates = values(name, "images_per_s")
        spread = f"{statistics.median(rates):6.2f} [{min(rates):.1f}-{max(rates):.1f}]"
        line = (f"{label_of(name):<24}{spread:>20}{ratio(name, 'images_per_s'):>8.3f}"
                f"{statistics.median(values(name, 'steady')):>21.2f}{ratio(name, 'steady'):>8.3f}")
        if name != "bare":
            met = [ratio(name, key) >= PIPELINE_TARGET for key in ("images_per_s", "steady")]
            line += "  " + ("met" if all(met) else "MISSED" if not any(met) else
                            "met on median step only" if met[1] else "met on run record only")
        print(line)
    print(f"{'timm train.py':<24}{'n/a':>20}{'':>8}{'n/a':>21}{'':>8}  target ≥ 1.0× it: {TIMM_TRAIN_PY}")
    print(f"\n{threads} torch threads in every training process (DataLoader workers: 1 each); medians over "
          f"{len(rounds)} of {run} rounds. 'run record': images over the seconds of the training loops, epoch "
          f"start-up and first step included (metrics.jsonl / final.json); 'median step': the median gap between two "
          f"training forwards.")


if __name__ == "__main__":
    main()
