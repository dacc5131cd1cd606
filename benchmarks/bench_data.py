"""The data path of the 448 px recipes per core and through a DataLoader (a script, not a test).

On JPEGs this script writes with CUB's and Stanford Cars' size distributions (quality 90, photo-like content: an
upsampled random field plus grain, so decoding costs what it would):

* CUB-like: longest side 500, as CUB's images; three in four landscape (500 wide, 300-400 high), one in four
  portrait (300-400 wide, 500 high), sizes uniform in those ranges.
* Cars-like: larger and varying widely, as Stanford Cars' images: width uniform in 300-1600 px, aspect ratio
  (width / height) uniform in 1.2-2.0.

It measures, side by side in one run, with interleaved and repeated rounds (candidates in a fresh random order each
round; medians over rounds):

(a) the training transform per image on one core, in CPU time (one torch thread; PIL and libjpeg-turbo are
    single-threaded), from the stored bytes to what a DataLoader worker hands over, for the ``cub`` and ``cars``
    recipes (``resize600_crop`` / ``resize512_crop``, 448 px): the project's ``fast`` pipeline (torchvision's
    decoder, transforms.v2 on uint8), its ``pil`` pipeline (the committed studies': PIL decode and transforms,
    uint8), today's path (PIL + ToTensor + Normalize, float32), timm's ``create_transform(448, is_training=True)``
    (PIL decode, random-resized crop, flip, colour jitter, ToTensor, Normalize) and the same with
    ``use_prefetcher=True`` (what timm's train.py runs in a worker: uint8 out). Each image is seeded as a worker
    seeds it; each round runs every candidate over all images, in a fresh random order;
(b) a DataLoader's images/s with 1, 2 and all workers (batch 16; the first batch, which includes the workers'
    start-up, is not counted), for both recipes, the ``fast`` pipeline against today's path;
(c) how far the ``fast`` pipeline's pixels are from the ``pil`` pipeline's on the same crops (the same seed draws the
    same crop, flip and jitter in both): per channel, the largest and the mean absolute difference in uint8 levels,
    for every augmentation mode and the eval transforms.

The machine's load is printed: load average before and after, and during (a) how many cores other processes kept
busy (``/proc/stat`` less this process). The last line reads ``data path: project X img/s per core, timm Y img/s
per core, ratio R`` (the ``cub`` recipe's training transform; the issue's target is R ≥ 4).

Example::

    python benchmarks/bench_data.py                 # 48 + 48 images, 5 rounds: the run in benchmarks/HISTORY.md
    python benchmarks/bench_data.py --quick         # smoke run: 8 + 8 images, 1 round, 1 worker count
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm
import torch
import torchvision
from PIL import Image, features
from torch.utils.data import DataLoader, Dataset

from timm_bninit.data.pipeline import decode_pil, uint8_pipeline
from timm_bninit.experiment.loaders import EpochIndex, EpochShuffleSampler, build_transforms
from timm_bninit.experiment.recipe import apply_overrides, load_recipe
from timm_bninit.experiment.seeding import rng_scope, seed_for, seed_globals

SEED = 0
TARGET = 4.0  # issue 20: project img/s per core ≥ 4 × timm's on the cub recipe's training transform
TIMM = "timm create_transform(448, is_training=True)"


# ---- generated images --------------------------------------------------------------------------------------------


def cub_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(300, 401))
    return (500, short) if rng.random() < 0.75 else (short, 500)


def cars_size(rng: np.random.Generator) -> tuple[int, int]:
    width = int(rng.integers(300, 1601))
    return width, round(width / rng.uniform(1.2, 2.0))


def photo_like_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG (quality 90) of a smooth random field plus grain: decodes and compresses like a photograph."""
    width, height = size
    field = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def stored_images(count: int, size: Callable[[np.random.Generator], tuple[int, int]], seed: int) -> list[dict]:
    """What a split's ``image`` column holds undecoded (``datasets.Image(decode=False)``)."""
    rng = np.random.default_rng(seed)
    return [{"bytes": photo_like_jpeg(rng, size(rng)), "path": None} for _ in range(count)]


# ---- the candidates ----------------------------------------------------------------------------------------------


def recipe_transforms(recipe: str, augmentation: str | None = None) -> tuple[Any, Any]:
    """The recipe's train and eval transforms as a run builds them (today's: PIL ... ToTensor, Normalize)."""
    config = load_recipe(recipe)
    if augmentation is not None:
        config = apply_overrides(config, [f"augmentation={augmentation}"])
    # the recipe's pretrained tag decides the data config (interpolation, crop_pct); no weights are needed for that
    model = timm.create_model(config.pretrained, pretrained=False)
    return build_transforms(config, model)


def candidates(recipe: str) -> dict[str, Callable[[dict], torch.Tensor]]:
    train, _ = recipe_transforms(recipe)
    fast, pil = uint8_pipeline(train, "fast"), uint8_pipeline(train, "pil")
    timm_float = timm.data.create_transform(448, is_training=True)
    timm_uint8 = timm.data.create_transform(448, is_training=True, use_prefetcher=True)
    return {
        "project fast (uint8)": fast,
        "project pil (uint8)": pil,
        "today: PIL + ToTensor + Normalize": lambda value: train(decode_pil(value)),
        TIMM: lambda value: timm_float(decode_pil(value)),
        "timm, use_prefetcher=True (uint8)": lambda value: timm_uint8(decode_pil(value)),
    }


# ---- (a) per image, one core -------------------------------------------------------------------------------------


def busy_seconds() -> tuple[float, float, float] | None:
    """(wall, busy seconds of every core, this process's CPU seconds): their differences give others' load."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime


def others_cores(before: tuple | None, after: tuple | None) -> float | None:
    if before is None or after is None:
        return None
    wall, busy, own = (a - b for a, b in zip(after, before))
    return max(busy - own, 0.0) / wall


def cpu_ms_per_image(transform: Callable[[dict], torch.Tensor], values: list[dict]) -> float:
    """CPU milliseconds per image of ``values`` through ``transform``, each seeded as a worker seeds its sample."""
    start = time.process_time()
    for index, value in enumerate(values):
        seed_globals(seed_for(SEED, "augment", 0, index))  # the same seeds for every candidate
        transform(value)
    return (time.process_time() - start) * 1000 / len(values)


def measure_per_core(sets: dict[str, list[dict]],
                     rounds: int) -> tuple[dict[tuple[str, str], list[float]], list[float]]:
    """CPU ms per image of every (recipe, candidate), one figure per round; others' load (cores) per round.

    Each round runs every candidate over its recipe's images, candidates in a fresh random order. CPU time, not wall
    time: what one core spends per image, not how long this process waited for one. A candidate runs image after
    image, as a worker does; interleaving candidates image by image would instead time each with the caches and
    allocator state the others left, which in a trial here slowed the fast pipeline far more than the PIL paths.
    """
    torch.set_num_threads(1)
    built = {recipe: candidates(recipe) for recipe in sets}
    jobs = [(recipe, name) for recipe in built for name in built[recipe]]
    for recipe, name in jobs:  # warm-up: first calls allocate and load kernels
        cpu_ms_per_image(built[recipe][name], sets[recipe][:4])
    times: dict[tuple[str, str], list[float]] = {job: [] for job in jobs}
    loads = []
    order = random.Random(SEED)
    for _ in range(rounds):
        order.shuffle(jobs)
        before = busy_seconds()
        for recipe, name in jobs:
            times[recipe, name].append(cpu_ms_per_image(built[recipe][name], sets[recipe]))
        load = others_cores(before, busy_seconds())
        if load is not None:
            loads.append(load)
    return times, loads


# ---- (b) through a DataLoader ------------------------------------------------------------------------------------


class SeededValues(Dataset):
    """Stored images through a transform, sample i of epoch e drawn from the stream (seed, e, i), as in a run."""

    def __init__(self, values: list[dict], transform: Callable[[dict], torch.Tensor]):
        self.values, self.transform = values, transform

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: EpochIndex) -> tuple[torch.Tensor, int]:
        seed_globals(seed_for(SEED, "augment", index.epoch, int(index)))
        return self.transform(self.values[index]), 0


class _TodayPath:
    """PIL decode then the PIL transform with ToTensor + Normalize (a class: it pickles into workers)."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, value: dict) -> torch.Tensor:
        return self.transform(decode_pil(value))



def loader_images_per_s(dataset: Dataset, workers: int, batch_size: int, passes: int) -> float:
    sampler = EpochShuffleSampler(len(dataset), SEED)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        persistent_workers=True)
    images, start = 0, None
    for epoch in range(passes):
        sampler.set_epoch(epoch)
        for batch, _ in loader:
            if start is None:
                start = time.perf_counter()  # the workers' start-up and the first batch are not counted
                continue
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


def measure_loaders(sets: dict[str, list[dict]], worker_counts: list[int], rounds: int, batch_size: int,
                    passes: int) -> dict[tuple[str, str, int], float]:
    torch.set_num_threads(1)
    paths = {}
    for recipe in sets:
        train, _ = recipe_transforms(recipe)
        paths[recipe, "project fast (uint8)"] = SeededValues(sets[recipe], uint8_pipeline(train, "fast"))
        paths[recipe, "today (float32)"] = SeededValues(sets[recipe], _TodayPath(train))
    jobs = [(recipe, name, workers) for recipe, name in paths for workers in worker_counts]
    results: dict[tuple[str, str, int], list[float]] = {job: [] for job in jobs}
    order = random.Random(SEED + 1)
    for _ in range(rounds):
        order.shuffle(jobs)
        for recipe, name, workers in jobs:
            results[recipe, name, workers].append(
                loader_images_per_s(paths[recipe, name], workers, batch_size, passes))
    return {job: statistics.median(values) for job, values in results.items()}


# ---- (c) pixels, fast against pil on the same crops ----------------------------------------------------------------


def pixel_differences(values: list[dict], transform: Any) -> tuple[list[int], list[float]]:
    """Per channel: the largest and the mean |fast - pil| in uint8 levels over ``values``, each image seeded alike."""
    fast, pil = uint8_pipeline(transform, "fast"), uint8_pipeline(transform, "pil")
    largest, sums, count = torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.float64), 0
    for index, value in enumerate(values):
        with rng_scope(seed_for(SEED, "augment", 0, index)):
            ours = fast(value).int()
        with rng_scope(seed_for(SEED, "augment", 0, index)):
            reference = pil(value).int()
        difference = (ours - reference).abs().flatten(1)
        largest = torch.maximum(largest, difference.amax(dim=1))
        sums += difference.sum(dim=1, dtype=torch.float64)
        count += difference.shape[1]
    return largest.tolist(), (sums / count).tolist()


def measure_pixels(sets: dict[str, list[dict]]) -> list[tuple[str, str, list[int], list[float]]]:
    rows = []
    for recipe, values in sets.items():
        for augmentation in (None, "rrc", "flip", "none"):
            train, evaluation = recipe_transforms(recipe, augmentation)
            mode = augmentation or load_recipe(recipe).augmentation
            rows.append((recipe, f"{mode} train", *pixel_differences(values, train)))
            if augmentation is None or augmentation == "rrc":  # the two eval transforms: S×S + centre, timm's eval
                rows.append((recipe, f"{mode} eval", *pixel_differences(values, evaluation)))
    return rows


# ---- report ------------------------------------------------------------------------------------------------------


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}, Pillow {PIL.__version__} "
            f"(libjpeg-turbo {features.version('libjpeg_turbo')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="generated JPEGs per size distribution")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a) (medians over them)")
    parser.add_argument("--loader-rounds", type=int, default=3, help="interleaved rounds of (b)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passes", type=int, default=6, help="epochs over the images per loader measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 images, 1 round, 1 worker")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.loader_rounds, args.batch_size, args.passes = 8, 1, 1, 4, 2
    workers = [1] if args.quick else sorted({1, 2, os.cpu_count() or 1})
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    sets = {"cub": stored_images(args.images, cub_size, 1), "cars": stored_images(args.images, cars_size, 2)}
    for recipe, values in sets.items():
        kib = statistics.mean(len(v["bytes"]) for v in values) / 1024
        print(f"{recipe}: {len(values)} JPEGs, quality 90, mean {kib:.0f} KiB")

    rounds, loads = measure_per_core(sets, args.rounds)
    per_core = {job: statistics.median(values) for job, values in rounds.items()}
    load_text = f"others kept {min(loads):.2f}-{max(loads):.2f} cores busy" if loads else ""
    print(f"\n(a) training transform per image, one core (CPU time); median of {args.rounds} rounds; {load_text}")
    print(f"{'recipe':6} {'candidate':46} {'ms/img':>8} {'img/s':>8}  {'rounds (ms/img)':>15}")
    for (recipe, name), ms in per_core.items():
        spread = " ".join(f"{value:.2f}" for value in rounds[recipe, name])
        print(f"{recipe:6} {name:46} {ms:8.2f} {1000 / ms:8.1f}  {spread}")
    ratios = [theirs / ours for ours, theirs in zip(rounds["cub", "project fast (uint8)"], rounds["cub", TIMM])]
    print(f"cub, timm / project per round: {' '.join(f'{r:.2f}' for r in ratios)}")

    loaders = measure_loaders(sets, workers, args.loader_rounds, args.batch_size, args.passes)
    print(f"\n(b) DataLoader images/s (batch {args.batch_size}, median of {args.loader_rounds} rounds)")
    print(f"{'recipe':6} {'path':22} " + " ".join(f"{f'{w} worker(s)':>12}" for w in workers))
    for recipe in sets:
        for name in ("project fast (uint8)", "today (float32)"):
            print(f"{recipe:6} {name:22} " + " ".join(f"{loaders[recipe, name, w]:12.1f}" for w in workers))

    print("\n(c) |fast - pil| on the same crops, uint8 levels per channel (R, G, B): largest; mean")
    for recipe, mode, largest, mean in measure_pixels(sets):
        print(f"{recipe:6} {mode:22} max {largest}  mean [{', '.join(f'{m:.4f}' for m in mean)}]")

    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")
    project = 1000 / per_core["cub", "project fast (uint8)"]
    timm_rate = 1000 / per_core["cub", TIMM]
    print(f"target: ratio ≥ {TARGET:g}: {'met' if project / timm_rate >= TARGET else 'not met'}")
    print(f"data path: project {project:.0f} img/s per core, timm {timm_rate:.0f} img/s per core, "
          f"ratio {project / timm_rate:.2f}")


if __name__ == "__main__":
    main()
