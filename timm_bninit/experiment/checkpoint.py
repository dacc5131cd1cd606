"""The checkpoint of a run: written beside the old one and swapped in, so a kill at any moment leaves one whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .layout import CHECKPOINT_DIR, EMA_FILE, STATE_FILE, read_json, write_json

__all__ = ["save_checkpoint", "load_checkpoint", "remove_checkpoint"]


def _siblings(run_dir: Path) -> tuple[Path, Path, Path]:
    checkpoint = run_dir / CHECKPOINT_DIR
    return checkpoint, checkpoint.with_name(CHECKPOINT_DIR + ".new"), checkpoint.with_name(CHECKPOINT_DIR + ".old")


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], scheduler: Any, ema: Any) -> None:
    """Save every rank's state into a staging folder, then (main process) swap it in for the old checkpoint."""
    checkpoint, staging, previous = _siblings(run_dir)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    # save_state ends without a barrier and every rank writes its own random_states_<rank>.pkl: meet before the swap
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), staging / EMA_FILE)
        write_json(staging / STATE_FILE, {"state": state, "scheduler": scheduler.state_dict()})
        if checkpoint.exists():
            os.replace(checkpoint, previous)
        os.replace(staging, checkpoint)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], scheduler: Any, ema: Any) -> bool:
    """Restore the last checkpoint into the prepared objects and ``state``; False when there is none."""
    checkpoint, _, previous = _siblings(run_dir)
    if not checkpoint.exists() and (previous / STATE_FILE).is_file() and accelerator.is_main_process:
        os.replace(previous, checkpoint)  # killed between the two renames of a swap
    accelerator.wait_for_everyone()
    if not (checkpoint / STATE_FILE).is_file():
        return False
    accelerator.load_state(str(checkpoint))
    saved = read_json(checkpoint / STATE_FILE)
    state.update(saved["state"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.load_state_dict(torch.load(checkpoint / EMA_FILE, map_location=accelerator.device, weights_only=True))
    return True


def remove_checkpoint(run_dir: Path) -> None:
    """The run is finished: its result and best weights stay, the resume state goes."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
