"""Wall time and peak memory of ``scripts/finetune.py`` against timm's own ``train.py`` on the same job (a script).

Both are run as whole processes (interpreter start, imports, data, model, training, evaluation, checkpoints, exit),
side by side in paired rounds: each round runs both once, in alternating order, so a slow drift of the shared machine
hits both alike, and the ratio is taken pair by pair (project / timm), then its median over the rounds.

Time and memory are measured in separate rounds, because measuring memory disturbs the time. Per process, a
timing round measures the wall time (spawn to exit), the CPU seconds of the tree, the main process's peak RSS
(``wait4``) and how many cores other processes kept busy meanwhile (``/proc/stat`` minus the tree's and this
script's CPU time), so a round disturbed by someone else's job can be recognised (it is marked, kept out of the
medians and replaced); nothing polls the process. A memory round (``--memory-rounds``) runs the same pair again
and samples the peak memory of each process tree every ``--poll`` seconds: the sum of the proportional set sizes of
the script and its DataLoader workers (a page shared after ``fork`` is split among its sharers instead of counted
once per process, as a sum of resident sets would). One such sample reads ``/proc/<pid>/smaps_rollup`` of five
processes of ~1 GiB and costs ≈ 0.1 s of CPU here: at 4 samples a second that is ≈ 0.4 of this machine's 2 cores,
which slowed the sampled script by ≈ 8 % (benchmarks/HISTORY.md), so memory rounds are never timed.

timm's ``train.py`` is not in timm's PyPI packages. Get it from timm's source repository at a commit whose API
matches the installed timm, and pass its path::

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-src
    git -C /tmp/timm-src checkout v1.0.31      # the installed version's tag (or the newest commit before it)
    python benchmarks/bench_vs_timm.py --timm-train /tmp/timm-src/train.py

Two jobs, both on synthetic JPEGs this script writes (10 classes, a class-specific colour pattern plus noise, so
the networks learn something), batch 32, 2 workers, timm's
random-resized crop + flip + colour jitter (bicubic), SGD with plain momentum 0.9 (timm: ``--opt momentum``), weight
decay 1e-4 on weights only, cosine schedule without warm-up, evaluation after every epoch, a checkpoint after every
epoch, CPU, float32, no label smoothing, no prefetcher:

* ``scratch``: the issue's job. resnet18 from scratch, 640 training and 160 evaluation JPEGs of 96 px cropped to
  64 px, lr 0.05, 3 epochs.
* ``finetune``: resembles fine-tuning. resnet18 from a local weights file (a 1000-class state dict this script saves
  once; both sides drop its classifier and start a new 10-class one), 320 training and 160 evaluation JPEGs of
  144 px cropped to 112 px, lr 0.01, 2 epochs.

timm reads ``train/`` and ``validation/``; the project reads a second tree whose ``train/`` and ``test/`` are hard
links to the same files (the project requires a test split; without a validation split it evaluates, and selects
on, the test split once per epoch, as timm evaluates its validation split once per epoch). The project's data-set
cache is built once before the rounds (its cost is printed); every timed run then loads it, as any run after a
data set's first one does.

Example::

    python benchmarks/bench_vs_timm.py --timm-train /tmp/timm-peer/train.py                 # both jobs, 3 rounds
    python benchmarks/bench_vs_timm.py --timm-train /tmp/timm-peer/train.py --jobs scratch --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TARGET_TIME = 0.9  # the target: project wall time ≤ 0.9 × timm's
NUM_CLASSES = 10


@dataclass
class Job:
    """One job, spelled for both scripts."""

    name: str
    source_size: int
    img_size: int
    epochs: int
    lr: float
    pretrained: bool
    train_per_class: int
    eval_per_class: int
    timm_extra: tuple[str, ...] = ()  # more arguments for timm's train.py (--timm-extra)

    def project_args(self, data_dir: Path, run_dir: Path, cache_dir: Path, weights: Path | None) -> list[str]:
        sets = {"dataset": "imagefolder", "data_dir": data_dir, "model": "resnet18", "norm_layer": "null",
                "img_size": self.img_size, "batch_size": 32, "epochs": self.epochs, "lr": self.lr,
                "optimizer": "momentum", "momentum": 0.9, "weight_decay": 1e-4, "sched": "cosine",
                "warmup_epochs": 0, "num_workers": 2, "augmentation": "rrc", "preload": "false",
                "val_fraction": 0, "precise_bn_batches": 0, "label_smoothing": 0.0}
        if self.pretrained:
            sets["pretrained_file"] = weights
        args = [str(REPO / "scripts" / "finetune.py"), "--recipe", "demo", "--quiet", "--run-dir", str(run_dir),
                "--data-cache-dir", str(cache_dir)]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        return args

    def timm_args(self, train_py: Path, data_dir: Path, run_dir: Path, weights: Path | None) -> list[str]:
        args = [str(train_py), "--data-dir", str(data_dir), "--train-split", "train", "--val-split", "validation",
                "--model", "resnet18", "--num-classes", str(NUM_CLASSES), "--img-size", str(self.img_size),
                "-b", "32", "--epochs", str(self.epochs), "--lr", str(self.lr), "--sched", "cosine",
                "--sched-on-updates",  # the project's recipes step the cosine every update (step_on_epochs: false)
                "--warmup-epochs", "0", "--workers", "2", "--opt", "momentum", "--momentum", "0.9",
                "--weight-decay", "1e-4", "--smoothing", "0", "--train-interpolation", "bicubic",
                "--no-prefetcher", "--device", "cpu", "--output", str(run_dir.parent), "--experiment", run_dir.name]
        if self.img_size < 128:
            args += ["--crop-pct", "1.0"]  # the project evaluates small images uncropped
        if self.pretrained:
            args += ["--pretrained", "--pretrained-path", str(weights)]
        return args + list(self.timm_extra)


JOBS = {
    "scratch": Job("scratch", source_size=96, img_size=64, epochs=3, lr=0.05, pretrained=False, train_per_class=64,
                   eval_per_class=16),
    "finetune": Job("finetune", source_size=144, img_size=112, epochs=2, lr=0.01, pretrained=True,
                    train_per_class=32, eval_per_class=16),
}


@dataclass
class Measurement:
    wall: float
    peak_tree_mib: float
    peak_main_mib: float
    cpu_seconds: float
    other_cores: float
    returncode: int
    log: str = field(repr=False, default="")


def write_tree(root: Path, job: Job) -> tuple[Path, Path]:
    """Write the JPEGs once: ``root/timm/{train,validation}`` and ``root/project/{train,test}`` (hard links)."""
    rng = np.random.default_rng(0)
    timm_root, project_root = root / "timm", root / "project"
    centres = rng.uniform(0, 255, size=(NUM_CLASSES, 2, 3))  # two colours per class, blended along a class angle
    source_size = job.source_size
    for split, per_class, project_split in (("train", job.train_per_class, "train"),
                                            ("validation", job.eval_per_class, "test")):
        for label in range(NUM_CLASSES):
            folder, linked = timm_root / split / f"c{label:02d}", project_root / project_split / f"c{label:02d}"
            folder.mkdir(parents=True)
            linked.mkdir(parents=True)
            angle = np.pi * label / NUM_CLASSES
            ys, xs = np.mgrid[0:source_size, 0:source_size] / source_size
            blend = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None] % 1.0
            for i in range(per_class):
                pixels = centres[label, 0] * blend + centres[label, 1] * (1 - blend)
                pixels = pixels + rng.normal(0, 40, size=pixels.shape)
                path = folder / f"{split}_{label}_{i:03d}.jpg"
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
                os.link(path, linked / path.name)
    return timm_root, project_root


def save_weights(path: Path) -> Path:
    """A 1000-class resnet18 state dict (random: no hub here), standing in for a pretrained checkpoint."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _pss(pid: int) -> int:
    """Proportional set size in bytes (pages shared after ``fork`` split among their sharers); 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = list(map(int, fields))
    return sum(values) - values[3] - values[4]  # everything but idle and iowait


def measure(args: list[str], log_path: Path, poll: float | None) -> Measurement:
    """Run ``python *args`` to completion: wall time, CPU, the load of other processes, and with ``poll`` (seconds
    between samples) the peak PSS of the tree; without it nothing polls the process (peak tree memory is then 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    own_before = sum(os.times()[:2])
    busy_before = _busy_jiffies()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent,
                                   start_new_session=True)  # its own process group, so an interrupt ends its workers
        handle, peak = psutil.Process(process.pid), 0
        try:
            status, usage, peak = _wait(process, handle, poll)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime  # the script and every child it reaped (its DataLoader workers)
    own = sum(os.times()[:2]) - own_before
    other = ((_busy_jiffies() - busy_before) / ticks - cpu - own) / wall
    return Measurement(wall, peak / 2**20, usage.ru_maxrss / 1024, cpu, max(other, 0.0), process.returncode,
                       log_path.read_text())


def _wait(process: subprocess.Popen, handle: psutil.Process, poll: float | None) -> tuple[int, Any, int]:
    """Wait until the process exits: its wait status, its rusage and (when polling) the peak PSS of its tree."""
    peak = 0
    if poll is None:
        _, status, usage = os.wait4(process.pid, 0)
        return status, usage, peak
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return status, usage, peak
        try:
            tree = [handle, *handle.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        peak = max(peak, sum(_pss(member.pid) for member in tree))
        time.sleep(poll)


def run_job(job: Job, train_py: Path, work: Path, weights: Path | None, rounds: int, max_rounds: int,
            max_other: float, poll: float, memory_rounds: int) -> None:
    print(f"\n== job {job.name}: resnet18, batch 32, {job.source_size} px JPEGs -> {job.img_size} px, "
          f"{job.epochs} epochs, lr {job.lr}, {'weights from a local file' if job.pretrained else 'from scratch'}")
    started = time.perf_counter()
    timm_root, project_root = write_tree(work / f"data-{job.name}", job)
    print(f"   {NUM_CLASSES * job.train_per_class} training + {NUM_CLASSES * job.eval_per_class} evaluation JPEGs "
          f"written in {time.perf_counter() - started:.1f} s")
    cache = work / "cache"
    started = time.perf_counter()
    import datasets

    from timm_bninit.data import load_image_dataset

    datasets.disable_progress_bars()
    load_image_dataset("imagefolder", data_dir=project_root, cache_dir=cache, val_fraction=0)
    print(f"   project's data-set cache built in {time.perf_counter() - started:.1f} s (once per data set; "
          "every timed run loads it)")

    def pair(attempt: int, poll: float | None) -> tuple[list[str], Measurement, Measurement]:
        """Both scripts once, in an order that alternates with ``attempt``."""
        order = ["project", "timm"] if attempt % 2 == 0 else ["timm", "project"]
        results: dict[str, Measurement] = {}
        for side in order:
            run_dir = work / "runs" / f"{job.name}-{side}-{'memory' if poll else 'time'}-{attempt}"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            if side == "project":
                command = job.project_args(project_root, run_dir, cache, weights)
            else:
                command = job.timm_args(train_py, timm_root, run_dir, weights)
            result = measure(command, work / "runs" / f"{run_dir.name}.log", poll)
            if result.returncode != 0:
                raise SystemExit(f"{side} failed (exit {result.returncode}):\n{result.log[-3000:]}\n"
                                 f"command: python {' '.join(command)}")
            results[side] = result
            shutil.rmtree(run_dir, ignore_errors=True)
        return order, results["project"], results["timm"]

    pairs: list[tuple[Measurement, Measurement]] = []
    every: list[tuple[Measurement, Measurement]] = []
    attempt = 0
    while len(pairs) < rounds and attempt < max_rounds:
        order, mine, theirs = pair(attempt, None)
        attempt += 1
        clean = max(mine.other_cores, theirs.other_cores) <= max_other
        print(f"   time round {attempt} ({' then '.join(order)}): project {describe(mine)} | timm {describe(theirs)} | "
              f"time {mine.wall / theirs.wall:.3f}" + ("" if clean else f"  [busy: other processes above {max_other} "
                                                                        "cores]"), flush=True)
        every.append((mine, theirs))
        if clean:
            pairs.append((mine, theirs))
    if pairs:
        summarise_time(f"{len(pairs)} clean time rounds of {attempt}", pairs)
    else:
        print(f"   no clean round in {attempt}: other processes kept more than {max_other} cores busy throughout")
    if len(pairs) < len(every):
        summarise_time(f"all {attempt} time rounds, busy ones included", every)
    sampled = []
    for attempt in range(memory_rounds):
        order, mine, theirs = pair(attempt, poll)
        print(f"   memory round {attempt + 1} ({' then '.join(order)}): project {mine.peak_tree_mib:5.0f} MiB | timm "
              f"{theirs.peak_tree_mib:5.0f} MiB | memory {mine.peak_tree_mib / theirs.peak_tree_mib:.3f}", flush=True)
        sampled.append((mine, theirs))
    if sampled:
        summarise_memory(f"{len(sampled)} memory rounds (sampled every {poll} s, not timed)", sampled)


def describe(result: Measurement) -> str:
    return (f"{result.wall:6.1f} s (main RSS {result.peak_main_mib:5.0f} MiB, cpu {result.cpu_seconds:5.1f} s, "
            f"others {result.other_cores:.2f} cores)")


def summarise_time(label: str, pairs: list[tuple[Measurement, Measurement]]) -> None:
    """Medians over the rounds: of each side's wall and CPU time, and of the pair-by-pair ratio (the target)."""
    ratios = [m.wall / t.wall for m, t in pairs]
    cpu_ratios = [m.cpu_seconds / t.cpu_seconds for m, t in pairs]
    median = statistics.median(ratios)
    print(f"   {label}: median wall project {statistics.median(m.wall for m, _ in pairs):.1f} s, timm "
          f"{statistics.median(t.wall for _, t in pairs):.1f} s; CPU seconds ratio median "
          f"{statistics.median(cpu_ratios):.3f}")
    print(f"     time ratio project/timm: median {median:.3f} (pairs {', '.join(f'{r:.3f}' for r in ratios)})"
          f"; target ≤ {TARGET_TIME}: {'met' if median <= TARGET_TIME else 'NOT met'}")


def summarise_memory(label: str, pairs: list[tuple[Measurement, Measurement]]) -> None:
    """Medians over the memory rounds: each side's peak tree PSS and the pair-by-pair ratio (the target)."""
    ratios = [m.peak_tree_mib / t.peak_tree_mib for m, t in pairs]
    median = statistics.median(ratios)
    print(f"   {label}: median peak tree memory project {statistics.median(m.peak_tree_mib for m, _ in pairs):.0f} "
          f"MiB, timm {statistics.median(t.peak_tree_mib for _, t in pairs):.0f} MiB")
    print(f"     memory ratio project/timm: median {median:.3f} (pairs {', '.join(f'{r:.3f}' for r in ratios)}); "
          f"target ≤ 1: {'met' if median <= 1 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", type=Path, required=True,
                        help="path of timm's train.py (from timm's source repository, at the installed version's tag)")
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["scratch", "finetune"])
    parser.add_argument("--rounds", type=int, default=3, help="clean paired time rounds per job (default 3)")
    parser.add_argument("--max-rounds", type=int, default=None, help="give up after this many (default 2 × rounds)")
    parser.add_argument("--max-other-load", type=float, default=0.3,
                        help="a round in which other processes kept more cores busy is left out (default 0.3)")
    parser.add_argument("--memory-rounds", type=int, default=2,
                        help="paired rounds that sample memory, after the timed ones (default 2; never timed)")
    parser.add_argument("--poll", type=float, default=0.25, help="memory sampling interval in seconds (default 0.25)")
    parser.add_argument("--timm-extra", default="",
                        help="more arguments for timm's train.py, one string, e.g. --timm-extra=--channels-last")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, logs)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: stop the running script's tree too
    if not args.timm_train.is_file():
        raise SystemExit(f"error: {args.timm_train} is not a file; pass the path of timm's train.py (see --help)")

    import timm
    import torch

    print(f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}, timm {timm.__version__}, "
          f"python {sys.version.split()[0]}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"timm train.py: {args.timm_train}" + (f" {args.timm_extra}" if args.timm_extra else ""))
    work = Path(tempfile.mkdtemp(prefix="bench_vs_timm_"))
    started = time.perf_counter()
    try:
        wanted = any(JOBS[name].pretrained for name in args.jobs)
        weights = save_weights(work / "resnet18_1000.safetensors") if wanted else None
        for name in args.jobs:
            job = dataclasses.replace(JOBS[name], timm_extra=tuple(shlex.split(args.timm_extra)))
            run_job(job, args.timm_train.resolve(), work, weights, args.rounds,
                    args.max_rounds or 2 * args.rounds, args.max_other_load, args.poll, args.memory_rounds)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
