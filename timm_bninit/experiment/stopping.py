"""What stops a run before its last epoch: a training loss that is no longer finite (the run *diverged*), and a request
to stop (SIGTERM: Slurm's preemption or ``scancel``; SIGINT: Ctrl-C).

Neither costs a host–device synchronisation per step. :class:`StepChecks` copies each step's loss into a small buffer
on the device and reads it every :data:`CHECK_EVERY` steps and at the end of every epoch, in one collective that also
carries the stop request: every rank of an N-process job learns the same thing at the same step and stops there. The
first non-finite loss is divergence; a step that fp16's loss scaler skips is not (the scaler skips on non-finite
*gradients*, and the loss it scaled was finite). :func:`stop_on_signals` turns SIGTERM and SIGINT into a request for the
duration of a run or sweep; the run stops at its next read (one process: after its current step) and leaves every
checkpoint it wrote as it was. Exit codes of the command lines: :data:`DIVERGED_EXIT_CODE`, and 128 + the signal's
number for an interrupted run (:func:`interrupted_exit_code`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CHECK_EVERY", "DIVERGED_EXIT_CODE", "RunDiverged", "RunInterrupted", "StopRequest", "StepChecks", "leaving",
           "stop_on_signals", "stop_requested", "follow_sweep", "interrupted_exit_code"]

CHECK_EVERY = 8          # training steps between two reads of the loss buffer and the stop request
DIVERGED_EXIT_CODE = 3   # finetune.py: the run diverged (0 finished, 1 unexpected error, 2 bad input, 128+N signal N)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def interrupted_exit_code(signum: int) -> int:
    """The shell's code for a process stopped by signal ``signum``: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class RunDiverged(Exception):
    """The training loss was not finite at ``step`` (1-based, in batches) of ``epoch`` (1-based); ``loss`` is its
    value (the mean over the ranks' losses of that step, so NaN or ±inf)."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(epoch, step, loss)
        self.epoch, self.step, self.loss = epoch, step, loss

    def __str__(self) -> str:
        return f"diverged in epoch {self.epoch} at step {self.step} (training loss {self.loss})"


class RunInterrupted(KeyboardInterrupt):
    """A run, or a sweep, stopped at a step boundary because SIGTERM or SIGINT asked it to; every checkpoint it wrote is
    as it was. A ``KeyboardInterrupt``: code that handles Ctrl-C handles it, and ``except Exception`` does not swallow
    it.

    Attributes:
        signum: The signal that asked.
        where: Where it stopped (``in epoch 3 after step 16``).
        run_dir: The stopped run's directory (None for a sweep).
        checkpoint_epoch: Epochs in its last checkpoint (0: none yet).
    """

    def __init__(self, signum: int, where: str, run_dir: Path | None = None, checkpoint_epoch: int = 0) -> None:
        super().__init__(signum, where, run_dir, checkpoint_epoch)
        self.signum, self.where, self.run_dir, self.checkpoint_epoch = signum, where, run_dir, checkpoint_epoch

    def __str__(self) -> str:
        text = f"interrupted by {signal.Signals(self.signum).name} {self.where}"
        if self.run_dir is None:
            return text
        kept = (f"its checkpoint after epoch {self.checkpoint_epoch} is intact" if self.checkpoint_epoch else
                "it had no checkpoint yet, so a resume starts it from the beginning")
        return f"{self.run_dir}: {text}; {kept}"


# In a worker process of a parallel sweep: the sweep's shared stop (a multiprocessing.Value holding a signal number)
_SWEEP_STOP: Any = None


class StopRequest:
    """The first stop signal this process received inside :func:`stop_on_signals`, or its sweep's (None: none)."""

    def __init__(self, shared: Any = None) -> None:
        self.signum: int | None = None
        self.shared = shared
        # a parallel sweep's shared stop (a lock-free multiprocessing value): the handler writes the signal into it, so
        # the sweep's runs see it at their next step rather than at the sweep's next look
        self.forward: Any = None

    def requested(self) -> int | None:
        return self.signum or (self.shared.value if self.shared is not None else 0) or None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if self.forward is not None:
                self.forward.value = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C a second time stops at once, as it would without this handler
        # another SIGTERM: already stopping (Slurm and a launcher such as torchrun may each send one)


_ACTIVE: StopRequest | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT ask whatever runs inside this block to stop; the previous handlers come back after it (a
    handler that code inside the block replaced, as :func:`leaving` does, stays as that code set it).

    Nested blocks share the outermost request, so a command line, its sweep and the runs the sweep starts in its own
    process answer one signal. Only the main thread can install handlers: in another thread the request is set by
    nothing but a parallel sweep's shared stop. A SIGINT the process ignores (started in the background) stays ignored.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    request = StopRequest(_SWEEP_STOP)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}
    for signum in STOP_SIGNALS:
        if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, request._handle)
    _ACTIVE = request
    try:
        yield request
    finally:
        _ACTIVE = None
        for signum, handler in previous.items():
            if signal.getsignal(signum) == request._handle:  # one that code in the block set stays (see leaving)
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: installed outside Python


def leaving(launched: bool) -> None:
    """This process has its exit code and only leaves now: under a launcher (``launched``), SIGTERM is ignored from
    here on. torchrun sends it to the ranks still running once one has exited with a code other than 0 (a stop's 143,
    a divergence's 3), and a rank a little slower to leave would be killed by it mid-exit (torchrun reports -15, not
    the code it chose)."""
    if launched and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_requested() -> int | None:
    """The signal that asked the current :func:`stop_on_signals` block to stop, if one did."""
    return None if _ACTIVE is None else _ACTIVE.requested()


def sweep_stopped() -> int | None:
    """In a worker of a parallel sweep: the signal that stopped the sweep, if one did (None elsewhere)."""
    return (_SWEEP_STOP.value or None) if _SWEEP_STOP is not None else None


def follow_sweep(shared: Any) -> None:
    """Initialise a worker process of a parallel sweep: its runs stop when the sweep sets ``shared`` (a
    ``multiprocessing.Value``) to a signal number; Ctrl-C reaches the sweep, which decides, so the worker ignores it."""
    global _SWEEP_STOP
    _SWEEP_STOP = shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StepChecks:
    """The checks of a run's training loop: divergence and stop requests, read every ``every`` steps.

    Each step's loss is copied into a buffer on the device (no synchronisation); :meth:`read` looks at the buffer and
    the stop request in one small collective, so all ranks raise at the same step. One process reads at once when a
    signal came (the request is a host flag), so it stops after its current step.

    Args:
        accelerator: The run's accelerator (device and process count).
        stop: The stop request to follow (None: none).
        every: Steps between two reads.
    """

    def __init__(self, accelerator: Any, stop: StopRequest | None = None, every: int = CHECK_EVERY) -> None:
        self.processes, self.device, self.every = accelerator.num_processes, accelerator.device, every
        self.stop = stop or StopRequest()
        self.losses = torch.empty(every, device=self.device)
        self.epoch = self.done = self.filled = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.done, self.filled = epoch, 0, 0

    def after_step(self, loss: torch.Tensor) -> None:
        self.losses[self.filled].copy_(loss.detach())
        self.filled += 1
        if self.filled == self.every or (self.processes == 1 and self.stop.requested()):
            self.read()

    def read(self) -> None:
        """Raise :class:`RunDiverged` at the first non-finite loss since the last read on any rank, else
        :class:`RunInterrupted` when any rank was asked to stop."""
        count = self.filled
        steps = torch.arange(count, device=self.device)
        # the first non-finite step of the window, or `count` when every loss was finite
        first = torch.where(torch.isfinite(self.losses[:count]), count, steps).amin() if count else steps.new_zeros(())
        flags = torch.stack([first, first.new_tensor(-(self.stop.requested() or 0))])
        if self.processes > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # the earliest step and the highest signal of any rank
        first, signum = flags.tolist()  # the one synchronisation of the window
        if first < count:
            loss = self.losses[first].clone()
            if self.processes > 1:
                dist.all_reduce(loss)
            raise RunDiverged(self.epoch + 1, self.done + first + 1, float(loss) / self.processes)
        self.done, self.filled = self.done + count, 0
        if signum:
            where = f"in epoch {self.epoch + 1} after step {self.done}" if self.done else f"after epoch {self.epoch}"
            raise RunInterrupted(-signum, where)

    def after_epoch(self) -> None:
        """Between two epochs (the checkpoint is written): stop here if any rank was asked to."""
        self.start_epoch(self.epoch + 1)
        self.read()
