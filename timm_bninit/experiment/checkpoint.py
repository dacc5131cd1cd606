"""A run's checkpoints: two kept, each checked against its manifest, so a kill or a damaged file costs an epoch at most.

A checkpoint is written into ``checkpoint.new/`` by every rank; after the ranks met, the main process adds the loop
state, the EMA and the best weights so far, then ``manifest.json`` last: every file's size and SHA-256, the epoch and
the number of ranks (whose random states must all be there). Only a written and verified checkpoint replaces
``checkpoint/``, whose former contents become ``checkpoint.previous/``; the one before is removed then. Resuming takes
the newest checkpoint whose files match its manifest and says in one line when it had to skip a newer one. Every
folder state a kill can leave between those renames holds an intact checkpoint.

``best_model.safetensors`` travels with the checkpoints: each holds the best weights as of its epoch (a hard link to
the run directory's file, which is replaced, never rewritten in place), and a resume puts that copy back. A fallback to
an older checkpoint then also discards a best-weights file written at the epochs it re-runs, so a finished run's file
is always the one its ``final.json`` names, whatever the re-run epochs give.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import save_file

from . import layout
from .layout import RunError, read_json, write_json

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "remove_checkpoint", "save_best_model",
           "checkpoint_problem", "raise_if_any_failed", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CheckpointError(RunError):
    """A checkpoint that could not be written, or a run with no intact checkpoint left to resume from."""


def _folders(run_dir: Path) -> tuple[Path, Path, Path]:
    """The staging, newest and previous checkpoint folders: newest first, as a resume looks at them."""
    return run_dir / layout.CHECKPOINT_NEW, run_dir / layout.CHECKPOINT_DIR, run_dir / layout.CHECKPOINT_PREVIOUS


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        if sync:  # on disk before the manifest vouches for it (Linux fsyncs a read-only descriptor)
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_manifest(folder: Path, epoch: int, num_processes: int) -> dict[str, Any]:
    files = {path.name: {"size": path.stat().st_size, "sha256": _sha256(path, sync=True)}
             for path in sorted(folder.iterdir()) if path.is_file() and path.name != layout.MANIFEST_FILE}
    manifest = {"format": MANIFEST_FORMAT, "epoch": epoch, "num_processes": num_processes, "files": files}
    write_json(folder / layout.MANIFEST_FILE, manifest)
    _fsync_dir(folder)
    return manifest


def checkpoint_problem(folder: Path, *, checksums: bool = True) -> str | None:
    """Why ``folder`` is not an intact checkpoint (a few words), or None when every file matches its manifest.

    Args:
        folder: A checkpoint folder.
        checksums: Also compare every file's SHA-256 (False: sizes only, for a folder whose files were just hashed).
    """
    try:
        manifest = read_json(folder / layout.MANIFEST_FILE)
    except FileNotFoundError:
        return f"no {layout.MANIFEST_FILE} (written only partly, or damaged)"
    except (OSError, ValueError) as error:
        return f"unreadable {layout.MANIFEST_FILE} ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{layout.MANIFEST_FILE} of another format"
    try:
        ranks = [f"random_states_{rank}.pkl" for rank in range(int(manifest["num_processes"]))]
        missing = [name for name in (layout.STATE_FILE, *ranks) if name not in files]
        if missing:
            return f"{layout.MANIFEST_FILE} lists no {', '.join(missing)}"
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, its manifest says {expected['size']}"
            if checksums and _sha256(path) != expected["sha256"]:
                return f"{name} does not match its SHA-256 in {layout.MANIFEST_FILE}"
    except (KeyError, TypeError, ValueError) as error:
        return f"damaged {layout.MANIFEST_FILE} ({type(error).__name__}: {error})"
    return None


def _epoch(folder: Path) -> int:
    return int(read_json(folder / layout.MANIFEST_FILE)["epoch"])


# ---------------------------------------------------------------------------------------------------------------
# Writing


def raise_if_any_failed(accelerator: Any, error: BaseException | None, what: str, run_dir: Path,
                        kept_epoch: int) -> None:
    """Meet the other ranks and raise :class:`CheckpointError` on every rank when any of them failed to write ``what``.

    A rank that raised alone would leave the others waiting at their next barrier; here every rank learns of the
    first failure and stops with the same one-line message, naming the checkpoint that is still intact.
    """
    reasons = [reason for reason in gather_object([None if error is None else f"{type(error).__name__}: {error}"])
               if reason is not None]
    if not reasons:
        return
    kept = (f"its checkpoint of epoch {kept_epoch} is intact: free space or fix the disk, then resume with --resume "
            f"--run-dir {run_dir} (a sweep: run it again with --retry-failed)" if kept_epoch else
            "it had no checkpoint yet: once the disk is fixed, --resume starts it again from its first epoch")
    reason = " ".join(reasons[0].split())  # one line, whatever the writer said
    raise CheckpointError(f"could not write {what} in {run_dir} ({reason}); {kept}")


def _attempt(action: Any, *args: Any) -> BaseException | None:
    # safetensors reports a full disk as SafetensorError and torch.save as RuntimeError, not as OSError: whatever the
    # type, every rank must learn of it
    try:
        action(*args)
    except Exception as error:
        return error
    return None


def save_best_model(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write ``best_model.safetensors`` beside the old one and replace it: the checkpoints' hard links keep theirs."""
    target = run_dir / layout.BEST_MODEL_FILE
    staging = target.with_name(target.name + ".tmp")
    try:
        save_file({name: tensor.contiguous().cpu() for name, tensor in weights.items()}, str(staging))
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _complete(staging: Path, run_dir: Path, state: dict[str, Any], scheduler: Any, ema: Any,
              num_processes: int) -> None:
    """The main process's part: loop state, EMA and best weights beside the ranks' files, the manifest last, then
    the swap once the new checkpoint checks out."""
    if ema is not None:
        torch.save(ema.state_dict(), staging / layout.EMA_FILE)
    write_json(staging / layout.STATE_FILE, {"state": state, "scheduler": scheduler.state_dict()})
    if (run_dir / layout.BEST_MODEL_FILE).is_file():
        _link_or_copy(run_dir / layout.BEST_MODEL_FILE, staging / layout.BEST_MODEL_FILE)
    _write_manifest(staging, state["epoch"], num_processes)
    problem = checkpoint_problem(staging, checksums=False)  # just hashed: sizes and the manifest read back suffice
    if problem is not None:
        raise OSError(f"the new checkpoint does not check out: {problem}")
    _promote(run_dir)


def _promote(run_dir: Path) -> None:
    """``checkpoint.new`` (complete) becomes ``checkpoint``, whose contents become ``checkpoint.previous``.

    A kill between any two steps leaves an intact checkpoint that :func:`load_checkpoint` finds."""
    staging, newest, previous = _folders(run_dir)
    if newest.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(newest, previous)
    os.replace(staging, newest)
    _fsync_dir(run_dir)


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], scheduler: Any, ema: Any) -> None:
    """Save every rank's state into ``checkpoint.new``, then (main process) complete, verify and swap it in.

    A failure to write (a full disk, any I/O error) on any rank leaves the previous checkpoints as they were and
    raises :class:`CheckpointError` on every rank.
    """
    staging = _folders(run_dir)[0]
    main = accelerator.is_main_process
    kept_epoch = state["epoch"] - 1
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = _attempt(accelerator.save_state, str(staging))
    # save_state ends without a barrier and every rank writes its own random_states_<rank>.pkl: the ranks meet here
    # (and learn whether every one of them wrote) before the manifest covers them all
    try:
        raise_if_any_failed(accelerator, error, f"the checkpoint of epoch {state['epoch']}", run_dir, kept_epoch)
        if main:
            error = _attempt(_complete, staging, run_dir, state, scheduler, ema, accelerator.num_processes)
        raise_if_any_failed(accelerator, error, f"the checkpoint of epoch {state['epoch']}", run_dir, kept_epoch)
    except CheckpointError:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def _choose(run_dir: Path) -> tuple[str | None, str | None, str | None]:
    """(main process) The folder to resume from, a line to say when a newer one was skipped, or the reason why none
    can be used: ``(name, note, failure)``. Skipped folders are removed (their epochs are trained again), and a
    complete ``checkpoint.new`` is swapped in as a kill had kept it from being."""
    found = [folder for folder in _folders(run_dir) if folder.exists()]
    skipped: dict[str, str] = {}
    chosen = None
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            chosen = folder
            break
        skipped[folder.name] = problem
    said = "; ".join(f"{name}: {problem}" for name, problem in skipped.items())
    if not found:
        return None, None, None
    if chosen is None:
        return None, None, (f"{run_dir} has no intact checkpoint to resume from ({said}); start the run again in a "
                            f"new run directory")
    for name in skipped:
        shutil.rmtree(run_dir / name)
    note = None if not skipped else (f"{run_dir}: skipped the newer checkpoint ({said}); resuming from {chosen.name} "
                                     f"(epoch {_epoch(chosen)})")
    if chosen.name == layout.CHECKPOINT_NEW:
        _promote(run_dir)
        chosen = run_dir / layout.CHECKPOINT_DIR
    return chosen.name, note, None


def _restore_best_model(checkpoint: Path, run_dir: Path) -> None:
    """The best weights as of the checkpoint's epoch, in place of any written at an epoch that is trained again."""
    if not (checkpoint / layout.BEST_MODEL_FILE).is_file():
        return
    staging = run_dir / (layout.BEST_MODEL_FILE + ".tmp")
    staging.unlink(missing_ok=True)
    _link_or_copy(checkpoint / layout.BEST_MODEL_FILE, staging)
    os.replace(staging, run_dir / layout.BEST_MODEL_FILE)


def load_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], scheduler: Any, ema: Any) -> bool:
    """Restore the newest intact checkpoint into the prepared objects and ``state``; False when there is none.

    Raises:
        CheckpointError: (every rank) checkpoints exist but none matches its manifest.
    """
    decision: list[Any] = [None, None, None]
    if accelerator.is_main_process:
        decision = list(_choose(run_dir))
    if accelerator.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    name, note, failure = decision
    if failure is not None:
        raise CheckpointError(failure)
    if note is not None and accelerator.is_main_process:
        print(note, flush=True)
    if name is None:
        return False
    checkpoint = run_dir / name
    accelerator.load_state(str(checkpoint))
    saved = read_json(checkpoint / layout.STATE_FILE)
    state.update(saved["state"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.load_state_dict(torch.load(checkpoint / layout.EMA_FILE, map_location=accelerator.device,
                                       weights_only=True))
    if accelerator.is_main_process:
        _restore_best_model(checkpoint, run_dir)
    accelerator.wait_for_everyone()
    return True


def remove_checkpoint(run_dir: Path) -> None:
    """The run is finished: its result and best weights stay, the resume state goes."""
    for folder in _folders(run_dir):
        shutil.rmtree(folder, ignore_errors=True)
