"""One run directory, one trainer: an exclusive lock that a run holds for its lifetime.

The lock is ``flock`` on ``<run dir>/run.lock``. The kernel releases it when its holder exits or dies, however it
dies, so a lock whose holder was killed is simply taken over by the next process; the file names the holder (host,
pid, start, command) for the message another process prints, and for the note of a takeover. The holder removes the
file while still holding the lock, so whoever then acquires the lock on the removed file sees that the path no longer
leads to it and locks the new file instead. A process forked from the holder (a DataLoader worker) closes its copy of
the descriptor, or it would keep the lock of a killed holder for as long as it outlived it.

On network file systems the lock is only as good as the mount's ``flock``: Linux NFS clients emulate it with byte-range
locks that the server arbitrates across machines (unless mounted ``nolock`` or ``local_lock=flock``/``all``, which make
it per machine), Lustre arbitrates it only when mounted with ``flock`` and refuses it without. A file system that
refuses it gets a warning and an unlocked run (docs/guide/finetuning.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from .layout import LOCK_FILE, RunError

__all__ = ["RunDirBusyError", "LockUnsupportedWarning", "exclusive", "hold_run_dir", "describe_holder"]

_HELD: set[int] = set()  # descriptors this process holds a lock through


def _close_in_child() -> None:
    for descriptor in _HELD:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirBusyError(RunError):
    """Another live process holds the lock: ``holder`` is its record (host, pid, started, command), if it wrote one."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder


class LockUnsupportedWarning(UserWarning):
    """The file system refuses ``flock``: nothing keeps a second trainer out."""


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host node7 since 2025-01-31 12:00:00``, or ``another process`` when the record is unknown."""
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {started}"


def _read_holder(descriptor_or_path: int | Path) -> dict[str, Any] | None:
    try:
        if isinstance(descriptor_or_path, int):
            text = os.pread(descriptor_or_path, 1 << 16, 0).decode()
        else:
            text = Path(descriptor_or_path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):  # SMB refuses reads of a locked file; a record cut short says nothing
        return None


def _lock(path: Path, wait: bool) -> int | None:
    """A descriptor of ``path`` holding its lock; None when the file system has no locks (warned)."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            holder = _read_holder(path)
            raise RunDirBusyError(f"{path.parent} is held by {describe_holder(holder)}", holder) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno == errno.ESTALE:  # NFS: the holder removed the file as it let go
                continue
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(f"{path.parent}: the file system refuses locks ({error.strerror}); nothing keeps a second "
                          f"process from using it at the same time", LockUnsupportedWarning, stacklevel=3)
            return None
        try:
            here = os.fstat(descriptor)
            current = os.stat(path)
            if (here.st_dev, here.st_ino) == (current.st_dev, current.st_ino):
                return descriptor
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ESTALE):
                os.close(descriptor)
                raise
        os.close(descriptor)  # the holder removed the file as it let go: lock the file now at that path


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, *, wait: bool = False) -> Iterator[dict[str, Any] | None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` body, then remove the file.

    Yields the record a previous holder left when it died holding the lock (None otherwise).

    Args:
        path: The lock file.
        wait: Wait for a live holder to let go instead of raising.

    Raises:
        RunDirBusyError: ``wait`` is false and a live process holds the lock.
    """
    path = Path(path)
    descriptor = _lock(path, wait)
    if descriptor is None:
        yield None
        return
    _HELD.add(descriptor)
    try:
        left = _read_holder(descriptor)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        yield left
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it: see the module docstring
        _HELD.discard(descriptor)
        os.close(descriptor)


@contextlib.contextmanager
def hold_run_dir(accelerator: Any, run_dir: Path, *, wait: bool = False, show: bool = False) -> Iterator[None]:
    """The main process holds ``run_dir``'s lock for the ``with`` body; every rank raises :class:`RunDirBusyError`
    when another live process holds it (``wait``: waits for it instead).

    A run directory this call created and left empty (the run was refused) is removed again.
    """
    created = not run_dir.exists()
    with contextlib.ExitStack() as stack:
        outcome: list[Any] = [None, None]  # (busy error's holder record, or None; a dead holder's record, or None)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.callback(_remove_if_empty, run_dir, created)
            try:
                outcome = [None, stack.enter_context(exclusive(run_dir / LOCK_FILE, wait=wait))]
            except RunDirBusyError as error:
                outcome = [error.holder or {}, None]
        if accelerator.num_processes > 1:
            broadcast_object_list(outcome, from_process=0)
        busy, died = outcome
        if busy is not None:
            raise RunDirBusyError(f"{run_dir} is being trained by {describe_holder(busy)}; a run directory has one "
                                  f"trainer at a time: wait for it to end (a sweep waits by itself), or stop that "
                                  f"process", busy or None)
        if died and show:
            print(f"{run_dir}: its last trainer ({describe_holder(died)}) ended without letting go of it; taking over",
                  flush=True)
        yield


def _remove_if_empty(run_dir: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
