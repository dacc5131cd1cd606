"""Certify a GPU machine for timm-bninit in one command: prints one table, exits 1 if a correctness row fails.

Rows (``--rows`` picks some; what a GPU run must show and the figures to expect: benchmarks/README.md):

* ``layers`` (correctness): every registered variant, one name per code path (its class and boolean options: ``rbn``
  and ``rbn_unit``, one ``bn_gamma*``), and torch's ``nn.BatchNorm2d``: one training step (forward, backward) and an
  eval forward on the device, float32 and bf16 autocast, NCHW and channels_last, against the same layer in float64
  on the CPU on the same values. Compared: output, input gradient, every parameter gradient, running statistics.
* ``speed`` (figures; the compiled half is also a correctness row): forward+backward time of each of them against
  the device's own ``nn.BatchNorm2d`` (cuDNN on a GPU), eager and ``torch.compile``-d (``fullgraph=True``: a graph
  break fails the row, and so does a compiled result that differs from eager; the variants that are plain BN at run
  time compile to BN's graph and are not compiled again), at ResNet-50's four stage shapes, in the recipes' setting
  (bf16 autocast, channels_last).
* ``data`` (figures): the ``cub`` recipe's training data path (benchmarks/bench_data.py's DataLoader measurement),
  images/s with one worker and with every core, the uint8 path against the float32 one it replaced.
* ``finetune`` (the run must finish; figures): ``scripts/finetune.py --recipe cub`` on generated CUB-sized JPEGs
  (resnet50 from scratch, 448 px, bf16, channels_last, 2 epochs): images/s of the second epoch and peak memory; with
  ``--timm-train PATH``, timm's ``train.py`` on the same job (its own augmentation, AMP bf16, ``--channels-last``).
* ``sync`` (correctness): with 2 or more GPUs (or ``--device cpu``: gloo), a 2-process ``sync_bn`` training step of
  every variant against the 1-process step on the full batch.

Tolerances, from the dtype and the computation (relative to the largest magnitude of each compared quantity):

* float32: a sum of n terms in any order is within (n − 1)·u·Σ|terms| of the exact sum (u = eps / 2), and the layer
  chains about four such reductions over its n = N·H·W values per channel (mean, variance, the backward's Σdy and
  Σdy·x̂): ``4·n·eps``. The 2-process comparison is the same bound on the full batch.
* bf16 autocast: the inputs are bf16 values (a convolution's output under autocast), which the float64 reference
  takes as they are; statistics, parameter gradients and running statistics are float32 (the bound above); the output
  and the input gradient are written in bf16, the latter through one bf16 intermediate: two roundings of at most
  eps_bf16 / 2 of a value up to twice the result's magnitude: ``2·eps_bf16`` more.

The reference is the same layer in float64 on the CPU, so these rows certify the device's kernels and precisions,
not the formulas (the test suite checks those against hand-derived ones). A wrong kernel (a memory-format or reduction
mistake) is off by O(1); an output off by 1e-3 relative already fails the float32 rows (tests/test_gpu_check.py).

Example::

    python benchmarks/gpu_check.py                                   # every row on cuda:0 (≤ 8 minutes on one GPU)
    python benchmarks/gpu_check.py --timm-train /tmp/timm-src/train.py
    python benchmarks/gpu_check.py --quick --device cpu              # the CPU rows, small shapes (a test runs it)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import timm_bninit as tb

REPO = Path(__file__).resolve().parent.parent
ROWS = ("layers", "speed", "data", "finetune", "sync")
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # (channels, side) of each stage at 224 px
BF16 = torch.bfloat16


@dataclass
class Row:
    """One line of the table. ``verdict``: ok, FAIL (a correctness row that failed), info (a figure), skipped."""

    check: str
    case: str
    result: str
    verdict: str = "info"


@dataclass(frozen=True)
class Settings:
    """What the rows run on: full size on a GPU, small shapes with ``--quick``."""

    device: torch.device
    quick: bool
    check_shape: tuple[int, int, int, int]  # correctness rows
    time_batch: int
    time_stages: tuple[tuple[int, int], ...]
    compiled: tuple[str, ...] | None  # layers timed compiled (None: all)
    rounds: int
    iterations: int  # forward+backward passes per timed sample


def settings_for(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    if args.quick:
        return Settings(device, True, (4, 16, 8, 8), 2, ((32, 8),), ("BatchNorm2d", "rbn"), 5, 5)
    return Settings(device, False, (8, 64, 14, 14), 32, RESNET50_STAGES, None, 15, 10)


# ---- layers and tolerances ------------------------------------------------------------------------------------------


def distinct_variants() -> dict[str, Callable[..., nn.Module]]:
    """``nn.BatchNorm2d`` and one registered name per code path (as tests/variants.py's ``distinct_forms``)."""
    found: dict[str, Callable[..., nn.Module]] = {"BatchNorm2d": nn.BatchNorm2d}
    seen = set()
    for name in tb.list_norm_layers():
        factory = tb.get_norm_layer(name)
        base = factory.func if isinstance(factory, functools.partial) else factory
        options = getattr(factory, "keywords", {})
        key = (base, tuple(sorted((k, v) for k, v in options.items() if isinstance(v, bool))))
        if key not in seen:
            seen.add(key)
            found[name] = factory
    return found


def make_layer(factory: Callable[..., nn.Module], channels: int, seed: int) -> nn.Module:
    """The layer in float64 on the CPU, training mode, every parameter away from its init (so every term of the
    backward matters), momentum 0.3 (so the running statistics move visibly)."""
    layer = factory(channels, dtype=torch.float64).train()
    layer.momentum = 0.3
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_(1.0 + 0.3 * noise if name == "weight" else 0.8 * noise)
    return layer


def activation(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 batch whose per-(sample, channel) means and scales differ, as a convolution's do, and dL/dy."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    means = torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64)
    scales = 0.5 + torch.rand(n, c, 1, 1, generator=gen, dtype=torch.float64)
    x = means + scales * torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def float32_tolerance(values_per_channel: int) -> float:
    return 4 * values_per_channel * torch.finfo(torch.float32).eps


def tolerances(dtype: torch.dtype, values_per_channel: int) -> tuple[float, float]:
    """(tolerance of what is stored in ``dtype``: output and input gradient; of what is float32: the rest)."""
    statistics_tolerance = float32_tolerance(values_per_channel)
    stored = statistics_tolerance + (2 * torch.finfo(BF16).eps if dtype == BF16 else 0.0)
    return stored, statistics_tolerance


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ---- correctness of every variant on the device --------------------------------------------------------------------


def step_results(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """One training step (output, input gradient, parameter gradients, running statistics) and an eval forward,
    under autocast when ``dtype`` is bf16, as a run computes them."""
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=BF16, enabled=dtype == BF16):
        y = layer(x)
    y.backward(grad.to(y.dtype))
    results = {"output": y, "input gradient": x.grad}
    results.update({f"∂L/∂{name}": param.grad for name, param in layer.named_parameters()})
    results.update({name: buffer for name, buffer in layer.named_buffers() if buffer.is_floating_point()})
    with torch.no_grad(), torch.autocast(x.device.type, dtype=BF16, enabled=dtype == BF16):
        results["eval output"] = layer.eval()(x)
    return results


def check_layer(factory: Callable[..., nn.Module], device: torch.device, dtype: torch.dtype,
                memory_format: torch.memory_format, shape: tuple[int, int, int, int]) -> tuple[float, str]:
    """The worst (error / tolerance) over every compared quantity, and its name: ≤ 1 passes."""
    reference = make_layer(factory, shape[1], seed=1)
    layer = copy.deepcopy(reference).to(device=device, dtype=torch.float32)
    x, grad = activation(shape, seed=2)
    x, grad = x.to(dtype).double(), grad.to(dtype).double()  # the values the device sees, exactly
    want = step_results(reference, x, grad, torch.float64)
    got = step_results(layer, x.to(device, dtype).contiguous(memory_format=memory_format),
                       grad.to(device, dtype).contiguous(memory_format=memory_format), dtype)
    stored, float32 = tolerances(dtype, shape[0] * shape[2] * shape[3])
    worst, what = 0.0, ""
    for name, value in want.items():
        tolerance = stored if name in ("output", "input gradient", "eval output") else float32
        ratio = relative_error(got[name], value) / tolerance
        if ratio > worst or not what:
            worst, what = ratio, name
    return worst, what


FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
DTYPES = {"fp32": torch.float32, "bf16": BF16}


def layer_rows(settings: Settings, variants: dict[str, Callable[..., nn.Module]]) -> list[Row]:
    rows = []
    for name, factory in variants.items():
        cases, failed = [], False
        for dtype_name, dtype in DTYPES.items():
            for format_name, memory_format in FORMATS.items():
                ratio, what = check_layer(factory, settings.device, dtype, memory_format, settings.check_shape)
                failed |= not ratio <= 1.0  # (NaN fails)
                cases.append(f"{dtype_name}/{format_name} {ratio:.2g}" + (f" ({what})" if ratio > 1 else ""))
        rows.append(Row(f"layer {name}", f"step + eval vs float64 CPU, {settings.check_shape}",
                        "error/tol " + ", ".join(cases), "FAIL" if failed else "ok"))
    return rows


# ---- speed against the device's BN, eager and compiled -------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x.grad = None
    with torch.autocast(x.device.type, dtype=BF16):
        y = layer(x)
    y.backward(grad)
    return y


def timed(fn: Callable[[], Any], device: torch.device, iterations: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def stage_input(settings: Settings, channels: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 channels_last activation of one ResNet-50 stage and its dL/dy: what the recipes' layers see."""
    x, grad = activation((settings.time_batch, channels, side, side), seed=channels)
    return (x.to(settings.device, BF16).contiguous(memory_format=torch.channels_last).requires_grad_(),
            grad.to(settings.device, BF16).contiguous(memory_format=torch.channels_last))


def compile_checked(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[nn.Module, float, float]:
    """``layer`` compiled (whole graph), its compile time, and its first step's error / tolerance against eager."""
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    got_y = forward_backward(compiled, x, grad).detach()
    got_dx = x.grad.clone()
    seconds = time.perf_counter() - start
    want_y = forward_backward(eager, x, grad).detach()
    stored, _ = tolerances(BF16, x.shape[0] * x.shape[2] * x.shape[3])
    ratio = max(relative_error(got_y, want_y.double()), relative_error(got_dx, x.grad.double())) / stored
    return compiled, seconds, ratio


def compiled_here(settings: Settings, name: str, layer: nn.Module) -> bool:
    """Whether ``name`` is timed compiled: every layer but the variants that are plain BN at run time (their
    compiled graph is BN's), or, with ``--quick``, only the few in ``settings.compiled``."""
    if settings.compiled is not None:
        return name in settings.compiled
    return name == "BatchNorm2d" or not getattr(layer, "plain_bn_forward", False)


def time_stage(settings: Settings, variants: dict[str, Callable[..., nn.Module]], channels: int, side: int,
               compiled_checks: dict[str, list[float]]) -> dict[tuple[str, str], list[float]]:
    """Per (layer, eager|compiled): its forward+backward seconds in each round (shuffled order every round)."""
    x, grad = stage_input(settings, channels, side)
    candidates = {}
    for name, factory in variants.items():
        layer = make_layer(factory, channels, seed=3).to(settings.device, torch.float32)
        candidates[(name, "eager")] = layer
        if compiled_here(settings, name, layer):
            try:
                compiled, seconds, ratio = compile_checked(copy.deepcopy(layer), x, grad)
            except Exception as error:  # a graph break under fullgraph=True, or a compiler failure
                compiled_checks.setdefault(name, []).append(math.inf)
                print(f"  {name} at {(channels, side)} did not compile: {type(error).__name__}: {error}"[:300])
                continue
            compiled_checks.setdefault(name, []).append(ratio)
            compiled_checks.setdefault(f"{name} seconds", []).append(seconds)
            candidates[(name, "compiled")] = compiled
    times: dict[tuple[str, str], list[float]] = {key: [] for key in candidates}
    order, shuffle = list(candidates), random.Random(channels)
    for round_index in range(settings.rounds + 1):  # round 0 warms up (cuDNN's choice of algorithm, caches)
        shuffle.shuffle(order)
        for key in order:
            seconds = timed(lambda key=key: forward_backward(candidates[key], x, grad), settings.device,
                            settings.iterations)
            if round_index:
                times[key].append(seconds)
    return times


def speed_rows(settings: Settings, variants: dict[str, Callable[..., nn.Module]]) -> list[Row]:
    compiled_checks: dict[str, list[float]] = {}
    stages = {}
    with torch._dynamo.config.patch(cache_size_limit=256):  # a compile per layer and shape, more than the default 8
        for channels, side in settings.time_stages:
            stages[(channels, side)] = time_stage(settings, variants, channels, side, compiled_checks)
    baseline = ("BatchNorm2d", "eager")
    rows = []
    for name in variants:
        for mode in ("eager", "compiled"):
            if (name, mode) not in next(iter(stages.values())):
                continue
            ratios = [statistics.median(t / b for t, b in zip(times[(name, mode)], times[baseline]))
                      for times in stages.values()]
            milliseconds = statistics.median(stages[next(iter(stages))][(name, mode)]) * 1e3
            rows.append(Row(f"speed {name} ({mode})", "fwd+bwd / device BN eager, bf16 NHWC, per stage",
                            " ".join(f"{r:.2f}" for r in ratios) + f" | geomean {geometric_mean(ratios):.2f}"
                            f" (stage 1: {milliseconds:.2f} ms)"))
    for name in variants:
        if name in compiled_checks:
            worst = max(compiled_checks[name])
            seconds = sum(compiled_checks.get(f"{name} seconds", []))
            rows.append(Row(f"compile {name}", "fullgraph, compiled step vs eager, every stage",
                            f"error/tol {worst:.2g}, compiled in {seconds:.0f} s", "ok" if worst <= 1 else "FAIL"))
    return rows


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---- the data path -------------------------------------------------------------------------------------------------


def write_jpegs(root: Path, splits: dict[str, int], classes: int, seed: int = 0) -> None:
    """An imagefolder tree of CUB-sized, photo-like JPEGs (benchmarks/bench_data.py's), so decoding and resizing cost
    what CUB's images do."""
    from bench_data import cub_size, photo_like_jpeg

    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        for index in range(count):
            path = root / split / f"class{index % classes}" / f"{index:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo_like_jpeg(rng, cub_size(rng)))


def data_path_rates(images: int, workers: list[int], batch_size: int) -> dict[tuple[str, int], float]:
    """Images/s of the ``cub`` recipe's training data path through a DataLoader, per (path, worker count): the
    project's ``fast`` uint8 path and the float32 path it replaced, on CUB-sized JPEGs (benchmarks/bench_data.py's
    measurement, the first batch not counted)."""
    from bench_data import cub_size, measure_loaders, stored_images

    rates = measure_loaders({"cub": stored_images(images, cub_size, seed=0)}, workers, rounds=1,
                            batch_size=batch_size, passes=1)
    return {(path, count): rate for (_, path, count), rate in rates.items()}


def data_rows(settings: Settings) -> list[Row]:
    cores = os.cpu_count() or 1
    workers, batch = sorted({1, cores}), 16
    images = 3 * batch * max(cores, 2 if settings.quick else 6)  # every worker fills a few batches
    threads = torch.get_num_threads()
    try:
        rates = data_path_rates(images, workers, batch)
    finally:
        torch.set_num_threads(threads)  # (bench_data measures the main process on one thread)
    text = "; ".join(f"{name} {rates[path, 1]:.0f} img/s with 1 worker, {rates[path, cores]:.0f} with {cores}"
                     for name, path in (("uint8 path", "project fast (uint8)"), ("old float32 path",
                                                                              "today (float32)")))
    return [Row("data path", f"cub recipe (resize600_crop, 448 px), {images} CUB-sized JPEGs, batch {batch}", text)]


# ---- a short fine-tuning run, and timm's train.py on the same job --------------------------------------------------

# Runs a script as __main__ and writes its peak memory at exit: the device's allocator peak on a GPU, else the
# process's peak resident set (DataLoader workers not counted).
PEAK_REPORTER = """
import atexit, json, os, resource, runpy, sys
def report():
    torch = sys.modules.get("torch")  # (nothing can be imported at exit)
    try:  # this program's high-water mark (ru_maxrss would count the parent's pages at the fork before exec)
        status = open("/proc/self/status").read()
        peak = {"rss_mib": int(status.split("VmHWM:")[1].split()[0]) / 1024}
    except (OSError, IndexError):
        peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["device_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(os.environ["GPU_CHECK_PEAK"], "w") as file:
        json.dump(peak, file)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Job:
    model: str
    img_size: int
    augmentation: str
    batch_size: int
    steps: int


def job_for(settings: Settings) -> Job:
    if settings.quick:
        return Job("test_resnet", 64, "resize80_crop", 8, 3)
    return Job("resnet50", 448, "resize600_crop", 32, 16)


def run_with_peak(args: list[str], log: Path, device: torch.device,
                  timeout: float) -> tuple[int, float, dict[str, float]]:
    """(exit code, wall seconds, peak memory) of ``python <script> <args>`` on ``device``, its output into ``log``."""
    peak_file = log.with_suffix(".peak.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "GPU_CHECK_PEAK": str(peak_file)}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would take a GPU if it saw one
    elif device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)  # the device asked for, as the job's only one
    start = time.perf_counter()
    with open(log, "w") as output:
        code = subprocess.run([sys.executable, "-c", PEAK_REPORTER, *args], env=env, stdout=output,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
    return code, time.perf_counter() - start, peak


def peak_text(peak: dict[str, float]) -> str:
    if "device_mib" in peak:
        return f"peak {peak['device_mib'] / 1024:.2f} GiB allocated on the device"
    return f"peak RSS {peak['rss_mib']:.0f} MiB" if peak else "peak unknown"


def finetune_rows(settings: Settings, work: Path, timm_train: Path | None) -> list[Row]:
    job, classes, workers = job_for(settings), 4, min(os.cpu_count() or 1, 8)
    folder = work / "finetune"
    write_jpegs(folder, {"train": job.batch_size * job.steps, "test": 2 * job.batch_size}, classes)
    sets = {"dataset": "imagefolder", "data_dir": folder, "model": job.model, "pretrained": "false",
            "img_size": job.img_size, "augmentation": job.augmentation, "batch_size": job.batch_size, "epochs": 2,
            "val_fraction": 0, "precise_bn_batches": 0, "num_workers": 0 if settings.quick else workers,
            "mixed_precision": "bf16", "channels_last": "true"}
    args = [str(REPO / "scripts" / "finetune.py"), "--recipe", "cub", "--quiet", "--run-dir", str(work / "run"),
            "--data-cache-dir", str(work / "cache")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    code, wall, peak = run_with_peak(args, work / "finetune.log", settings.device, timeout=900)
    case = f"{job.model}, {job.img_size} px, bf16, NHWC, batch {job.batch_size}, {job.steps} steps × 2 epochs"
    if code != 0 or not (work / "run" / "final.json").is_file():
        tail = (work / "finetune.log").read_text()[-400:].replace("\n", " | ")
        return [Row("finetune.py", case, f"exit {code}: …{tail}", "FAIL")]
    epochs = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [Row("finetune.py", case, f"epoch 2: {epochs[-1]['images_per_s']:.1f} img/s (epoch 1: "
                f"{epochs[0]['images_per_s']:.1f}); {peak_text(peak)}; whole process {wall:.0f} s", "ok")]
    if timm_train is not None:
        rows.append(timm_row(settings, job, classes, folder, work, timm_train, workers))
    return rows


def timm_row(settings: Settings, job: Job, classes: int, folder: Path, work: Path, train_py: Path,
             workers: int) -> Row:
    """timm's train.py on the same images, model, size, batch, epochs and precision (its own augmentation)."""
    args = [str(train_py), "--data-dir", str(folder), "--train-split", "train", "--val-split", "test",
            "--model", job.model, "--num-classes", str(classes), "--img-size", str(job.img_size),
            "-b", str(job.batch_size), "--epochs", "2", "--lr", "0.01", "--opt", "sgd", "--sched", "cosine",
            "--warmup-epochs", "0", "--workers", str(workers), "--amp", "--amp-dtype", "bfloat16",
            "--channels-last", "--device", str(settings.device), "--log-interval", "1000",
            "--output", str(work), "--experiment", "timm"]
    if settings.device.type != "cuda":
        args.append("--no-prefetcher")  # timm's prefetcher is for CUDA
    code, wall, peak = run_with_peak(args, work / "timm.log", settings.device, timeout=900)
    log = (work / "timm.log").read_text()
    rates = re.findall(r"Train: 1 \[.*?\(\s*[\d.]+s,\s+([\d.]+)/s\)", log)
    rate = f"epoch 2: {float(rates[-1]):.1f} img/s" if rates else "img/s not found in its log"
    verdict = "info" if code == 0 else "FAIL"
    return Row("timm train.py", "the same job (timm's transforms)",
               f"{rate}; {peak_text(peak)}; whole process {wall:.0f} s" if code == 0 else f"exit {code}", verdict)


# ---- 2-process sync_bn against 1 process ---------------------------------------------------------------------------


def sync_batch(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    x, grad = activation(shape, seed=5)
    return x.float(), grad.float()


def sync_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    results = {"output": y.detach().cpu(), "input gradient": x.grad.cpu()}
    results.update({f"∂L/∂{n}": p.grad.cpu() for n, p in layer.named_parameters()})
    results.update({n: b.cpu() for n, b in layer.named_buffers() if b.is_floating_point()})
    return results


def sync_worker(rank: int, backend: str, device_type: str, init_file: str, out_dir: str,
                shape: tuple[int, int, int, int]) -> None:
    """One of 2 processes: every variant converted with ``convert_sync_batchnorm``, one step on this rank's half."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on its own API, once per layer and rank
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, grad = sync_batch(shape)
        half = slice(0, shape[0] // 2) if rank == 0 else slice(shape[0] // 2, shape[0])
        results = {}
        for name, factory in distinct_variants().items():
            layer = tb.convert_sync_batchnorm(make_layer(factory, shape[1], seed=4)).to(device, torch.float32)
            results[name] = sync_step(layer, x[half].to(device), grad[half].to(device))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sync_rows(settings: Settings, work: Path) -> list[Row]:
    device = settings.device
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return [Row("sync_bn", "2 processes vs 1", f"needs 2 GPUs, {torch.cuda.device_count()} here", "skipped")]
    shape = settings.check_shape
    backend = "nccl" if device.type == "cuda" else "gloo"
    context = mp.start_processes(sync_worker, args=(backend, device.type, str(work / "sync-init"), str(work), shape),
                                 nprocs=2, join=False, start_method="spawn")
    with _killing(context):
        deadline = time.time() + 300
        while not context.join(timeout=1):
            if time.time() > deadline:
                return [Row("sync_bn", "2 processes vs 1", "did not finish in 300 s", "FAIL")]
    ranks = [torch.load(work / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    x, grad = sync_batch(shape)
    tolerance = float32_tolerance(shape[0] * shape[2] * shape[3])
    rows = []
    for name, factory in distinct_variants().items():
        want = sync_step(make_layer(factory, shape[1], seed=4).to(device, torch.float32), x.to(device),
                         grad.to(device))
        first, second = ranks[0][name], ranks[1][name]
        errors = []
        for key, value in want.items():
            if key in ("output", "input gradient"):
                errors.append(relative_error(torch.cat([first[key], second[key]]), value))
            elif key.startswith("∂L/∂"):  # each rank's loss is its half's part of the full batch's sum
                errors.append(relative_error(first[key] + second[key], value))
            else:  # every rank holds the full batch's running statistics
                errors += [relative_error(first[key], value), relative_error(second[key], value)]
        worst = max(errors) / tolerance
        rows.append(Row(f"sync_bn {name}", f"2 {backend} processes vs 1, fp32, {shape}", f"error/tol {worst:.2g}",
                        "ok" if worst <= 1 else "FAIL"))
    return rows


@contextmanager
def _killing(context: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ---- main ----------------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    widths = [max(len(getattr(r, field)) for r in rows) for field in ("check", "case")]
    header = f"{'check':<{widths[0]}}  {'case':<{widths[1]}}  verdict  result"
    print(header)
    print("-" * min(len(header) + 60, 200))
    for row in rows:
        print(f"{row.check:<{widths[0]}}  {row.case:<{widths[1]}}  {row.verdict:<7}  {row.result}")


def environment_text(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    count = f", {torch.cuda.device_count()} GPUs" if device.type == "cuda" else ""
    return (f"device {device} ({name}{count}); {os.cpu_count()} cores; torch {torch.__version__}, "
            f"cuDNN {torch.backends.cudnn.version()}")


def run_rows(settings: Settings, rows: list[str], work: Path, timm_train: Path | None) -> list[Row]:
    variants = distinct_variants()
    steps = {"layers": lambda: layer_rows(settings, variants), "speed": lambda: speed_rows(settings, variants),
             "data": lambda: data_rows(settings), "finetune": lambda: finetune_rows(settings, work, timm_train),
             "sync": lambda: sync_rows(settings, work)}
    table = []
    for name in rows:
        start = time.perf_counter()
        table += steps[name]()
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small shapes and a tiny job (the CPU rows in tests)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows (default: all)")
    parser.add_argument("--timm-train", type=Path, default=None, help="timm's train.py: run it on the same job")
    args = parser.parse_args(argv)
    settings = settings_for(args)
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; pass --device cpu (with --quick for the small CPU rows)",
              file=sys.stderr)
        return 2
    if settings.device.type == "cpu":
        torch.set_num_threads(1)  # CPU figures only keep the script honest; threads spinning on a shared CPU blur them
    print(environment_text(settings.device), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    try:
        rows = run_rows(settings, args.rows, work, args.timm_train)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows)
    failed = [row.check for row in rows if row.verdict == "FAIL"]
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every correctness row passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
