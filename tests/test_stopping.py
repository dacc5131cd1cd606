"""What stops a run early (issue 21, points 1 and 5): the device-side divergence check read every few steps, the
stop request that SIGTERM and SIGINT set, and both inside a real training loop: an injected non-finite loss stops the
epoch within the read interval, a step that the fp16 loss scaler skips does not."""

import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from fake_datasets import tiny_config

from timm_bninit.experiment import layout, stopping
from timm_bninit.experiment.distributed import make_accelerator
from timm_bninit.experiment.stopping import (
    CHECK_EVERY,
    RunDiverged,
    RunInterrupted,
    StepChecks,
    StopRequest,
    interrupted_exit_code,
    stop_on_signals,
)
from timm_bninit.experiment.sweep import RunSpec, _describe, run_one
from timm_bninit.experiment.train import build_run, train_one_epoch

ONE_CPU_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


def _steps_until_raised(checks: StepChecks, losses: list[float]) -> tuple[int, BaseException | None]:
    """Feed ``losses`` one step at a time, then read at the end of the epoch; the steps fed and what was raised."""
    taken = 0
    try:
        for value in losses:
            taken += 1
            checks.after_step(torch.tensor(value))
        checks.read()
    except (RunDiverged, RunInterrupted) as raised:
        return taken, raised
    return taken, None


def test_the_first_non_finite_loss_is_found_at_the_next_read():
    assert CHECK_EVERY == 8
    for bad in (float("nan"), float("inf"), -float("inf")):
        checks = StepChecks(ONE_CPU_PROCESS)
        checks.start_epoch(2)
        # step 11 is the first non-finite one; the buffer is read at steps 8 and 16
        taken, raised = _steps_until_raised(checks, [1.0] * 10 + [bad, 1.0, bad] + [1.0] * 20)
        assert isinstance(raised, RunDiverged) and taken == 16  # at the read after it: nothing is read per step
        assert (raised.epoch, raised.step) == (3, 11) and str(raised.loss) == str(bad)
        assert "epoch 3 at step 11" in str(raised)
    # large but finite is not divergence, and neither is an epoch of finite losses
    assert _steps_until_raised(StepChecks(ONE_CPU_PROCESS), [1e30] * 20) == (20, None)


def test_a_divergence_in_the_last_steps_of_an_epoch_is_read_at_its_end():
    checks = StepChecks(ONE_CPU_PROCESS)
    checks.start_epoch(0)
    for value in [1.0] * 9 + [float("nan")]:  # steps 9-10 wait for the next read
        checks.after_step(torch.tensor(value))
    with pytest.raises(RunDiverged, match="epoch 1 at step 10"):
        checks.read()


def test_a_stop_request_stops_one_process_after_its_current_step():
    request = StopRequest()
    checks = StepChecks(ONE_CPU_PROCESS, request)
    checks.start_epoch(4)
    for _ in range(3):
        checks.after_step(torch.tensor(1.0))
    request.signum = signal.SIGTERM  # as the handler sets it
    with pytest.raises(RunInterrupted) as raised:
        checks.after_step(torch.tensor(1.0))
    assert raised.value.signum == signal.SIGTERM and raised.value.where == "in epoch 5 after step 4"
    assert isinstance(raised.value, KeyboardInterrupt) and not isinstance(raised.value, Exception)
    # a non-finite loss in the same window wins: the run diverged, whatever else was asked
    checks.start_epoch(0)
    with pytest.raises(RunDiverged):
        checks.after_step(torch.tensor(float("nan")))
    # between epochs (after the checkpoint) the request is read too
    checks.start_epoch(1)
    with pytest.raises(RunInterrupted, match="after epoch 2"):
        checks.after_epoch()


def test_the_interrupted_message_names_the_checkpoint_and_the_exit_codes():
    stop = RunInterrupted(signal.SIGINT, "in epoch 3 after step 5", run_dir="runs/x", checkpoint_epoch=2)
    assert str(stop) == "runs/x: interrupted by SIGINT in epoch 3 after step 5; its checkpoint after epoch 2 is intact"
    fresh = RunInterrupted(signal.SIGTERM, "in epoch 1 after step 2", run_dir="runs/x")
    assert str(fresh).endswith("it had no checkpoint yet, so a resume starts it from the beginning")
    assert (interrupted_exit_code(signal.SIGINT), interrupted_exit_code(signal.SIGTERM)) == (130, 143)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a process started from a terminal (see terminal.py)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signals_set_the_request_and_the_previous_handlers_come_back(python_sigint):
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals() as request:
        assert request.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested() == signal.SIGTERM  # Python runs the handler before the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's copy of the same request: still stopping, nothing more
        with stop_on_signals() as inner:  # a run inside a sweep follows the sweep's request
            assert inner is request and stopping.stop_requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == request._handle  # the inner block restored nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C stops at once
    assert {signum: signal.getsignal(signum) for signum in before} == before
    assert stopping.stop_requested() is None

    with stop_on_signals() as request:  # the first Ctrl-C is a request, not a KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested() == signal.SIGINT


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process started in the background
    try:
        with stop_on_signals() as request:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert request.requested() is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_launched_rank_that_is_leaving_ignores_the_launchers_sigterm():
    # torchrun sends SIGTERM to the ranks still running once one exits with a code other than 0; a rank that has its
    # own exit code must leave with it, not be killed mid-exit (the 2-process stop test in test_distributed.py)
    previous, interrupt = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with stop_on_signals():
            stopping.leaving(launched=False)  # one process, nobody else's SIGTERM to expect: nothing changes
        assert signal.getsignal(signal.SIGTERM) == previous
        with stop_on_signals():
            stopping.leaving(launched=True)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # the block did not put the old handler back
        os.kill(os.getpid(), signal.SIGTERM)  # and the process is still here
        assert signal.getsignal(signal.SIGINT) == interrupt  # Ctrl-C acts as it did before the block
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_parallel_sweeps_shared_stop_reaches_its_runs(monkeypatch):
    shared = SimpleNamespace(value=0)  # a multiprocessing.Value in a sweep's worker
    monkeypatch.setattr(stopping, "_SWEEP_STOP", shared)
    with stop_on_signals() as request:
        assert request.requested() is None
        shared.value = signal.SIGINT  # the sweep was asked to stop
        assert request.requested() == signal.SIGINT


def test_a_run_queued_before_the_sweep_stopped_does_not_start(tiny_data, tmp_path, monkeypatch):
    # the process pool hands a worker one run more than it runs, which cancelling cannot take back
    monkeypatch.setattr(stopping, "_SWEEP_STOP", SimpleNamespace(value=signal.SIGTERM))
    run_dir = tmp_path / "run"
    spec = RunSpec("base", 0.1, 1, str(run_dir), tiny_config(tiny_data, tmp_path))
    assert run_one(spec) == {"status": "not started", "run_dir": str(run_dir)}
    assert layout.run_status(run_dir) == "pending" and not run_dir.exists()
    assert _describe(spec, run_one(spec)) == \
        "base lr=0.1 seed=1: not started, the sweep was stopped; re-run the sweep to start it"


class CountingLoss(torch.nn.CrossEntropyLoss):
    """The run's criterion, counting its calls; ``poison`` makes step ``poison`` return a non-finite loss."""

    def __init__(self, poison: int | None = None) -> None:
        super().__init__()
        self.calls, self.poison = 0, poison

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(logits, labels)
        return loss * float("nan") if self.calls == self.poison else loss


def _small_steps(tiny_data, tmp_path, **changes):
    """A run of the tiny data with two images a step (BN needs two): 13 steps an epoch, more than one read."""
    config = tiny_config(tiny_data, tmp_path, batch_size=2, precise_bn_batches=0, **changes)
    state = {"num_updates": 0, "train_seconds": 0.0, "train_images": 0}
    return config, state


def test_a_non_finite_loss_stops_the_epoch_at_the_next_read(tiny_data, tmp_path):
    config, state = _small_steps(tiny_data, tmp_path)
    accelerator = make_accelerator(config)
    run = build_run(config, accelerator, tmp_path / "cache")
    run.criterion = CountingLoss(poison=3)
    with pytest.raises(RunDiverged) as raised:
        train_one_epoch(run, 0, state, False, StepChecks(accelerator))
    assert (raised.value.epoch, raised.value.step) == (1, 3) and math.isnan(raised.value.loss)
    assert run.criterion.calls == CHECK_EVERY  # stopped at the first read after step 3, not at the epoch's end
    assert len(run.train_loader) > CHECK_EVERY


def _inf_gradient_at(run, step: int) -> None:
    """From the criterion's call count: the classifier's gradient at ``step`` is infinite, its loss finite."""
    weight = run.unwrapped.fc.weight
    weight.register_hook(lambda grad: grad * float("inf") if run.criterion.calls == step else grad)


def test_a_step_the_fp16_loss_scaler_skips_is_not_divergence(tiny_data, tmp_path):
    config, state = _small_steps(tiny_data, tmp_path)
    accelerator = make_accelerator(config)
    # fp16's scaler, as accelerate gives it on a GPU (on a CPU it gives none): set before prepare, which hands it
    # to the optimizer; growth only after 2000 clean steps, so the scale changes only where a step is skipped
    accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run = build_run(config, accelerator, tmp_path / "cache")
    run.criterion = CountingLoss()
    _inf_gradient_at(run, 2)
    stats = train_one_epoch(run, 0, state, False, StepChecks(accelerator))
    assert run.criterion.calls == len(run.train_loader) and math.isfinite(stats["train_loss"])
    assert scaler.get_scale() == 2.0**9  # step 2 skipped (the scale halved once), and the run went on
    assert all(torch.isfinite(p).all() for p in run.unwrapped.parameters())

    # the same gradient without a scaler is applied: the weights and the next loss are no longer finite
    config, state = _small_steps(tiny_data, tmp_path)
    accelerator = make_accelerator(config)
    run = build_run(config, accelerator, tmp_path / "cache")
    run.criterion = CountingLoss()
    _inf_gradient_at(run, 2)
    with pytest.raises(RunDiverged, match="epoch 1 at step 3"):
        train_one_epoch(run, 0, state, False, StepChecks(accelerator))
