"""What makes an N-process run mean the same as a 1-process run (docs/methods.md §10).

* A recipe's ``batch_size`` is the *global* batch: accelerate splits each batch over the processes
  (``split_batches=True``), so updates per epoch, lr, warm-up and schedule do not depend on the process count, and
  the N processes of a step see exactly the images the single process would.
* A job started with a world size > 1 on a machine without GPUs (``torchrun --nproc_per_node N``) runs as a real
  N-process gloo job: accelerate sees a CPU job as distributed only when asked for the CPU.
* BN running statistics are per rank until averaged: :func:`average_bn_statistics` before every recalibration,
  evaluation and save.
* ``AcceleratorState`` is a per-process singleton; each run starts from a fresh one, so runs with different mixed
  precision can follow each other in one process (a sweep at ``--parallel 1``, a study's pretraining step).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from timm.utils import distribute_bn
from torch import nn

from .layout import RunError
from .recipe import Recipe

__all__ = ["launched_world_size", "make_accelerator", "average_bn_statistics", "shared_run_dir", "is_main_process"]

LAUNCH_HELP = ("launch N processes with `torchrun --nproc_per_node N scripts/finetune.py ...` (GPUs: nccl; a CPU "
               "machine: gloo) or `accelerate launch --multi_gpu --num_processes N scripts/finetune.py ...` on GPUs")


def launched_world_size() -> int:
    """The world size a launcher (torchrun, accelerate launch, Slurm's srun through torchrun) asked for."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _wants_cpu() -> bool:
    # torchrun on a machine without GPUs: ask accelerate for the CPU, or it starts N independent 1-process runs
    return launched_world_size() > 1 and not torch.cuda.is_available()


def make_accelerator(config: Recipe, *, log_with: Any = None, project_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator for one run; refuses (before any work) a launch it would not see as distributed."""
    AcceleratorState._reset_state()  # keeps the process group (PartialState); forgets the last run's precision
    GradientState._reset_state()
    accelerator = Accelerator(cpu=_wants_cpu(), mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum_steps, log_with=log_with,
                              project_dir=project_dir,
                              # non_blocking: the pinned uint8 batch's copy to a GPU overlaps the step
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False,
                                                                        split_batches=True, non_blocking=True))
    if launched_world_size() != accelerator.num_processes:
        raise RunError(f"the launcher started {launched_world_size()} processes but accelerate sees "
                       f"{accelerator.num_processes}: they would race on one run directory; {LAUNCH_HELP}")
    if config.batch_size % accelerator.num_processes:
        raise RunError(f"batch_size={config.batch_size} is the global batch and must divide evenly over "
                       f"{accelerator.num_processes} processes; choose a multiple of {accelerator.num_processes} "
                       f"(--set batch_size=...)")
    return accelerator


def is_main_process() -> bool:
    """Whether this process prints and writes (rank 0, or the only process), without building an Accelerator."""
    return int(os.environ.get("RANK", "0")) == 0


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's choice of a run directory, for every rank (a timestamped name could differ between ranks)."""
    if launched_world_size() == 1:
        return run_dir
    PartialState(cpu=_wants_cpu())  # joins the process group the launcher set up
    chosen = [str(run_dir)]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def average_bn_statistics(accelerator: Accelerator, *models: nn.Module | None) -> None:
    """Average every norm layer's running mean and variance over the processes (every variant keeps BN's buffers)."""
    if accelerator.num_processes == 1:
        return
    for model in models:
        if model is not None:
            distribute_bn(model, accelerator.num_processes, reduce=True)
