"""RBN, IEBN and blended-σ BN (their hand-written autograd Function) under torch.compile and CPU bf16 autocast.

Compiled: a small conv net with every calibrated layer is compiled with ``fullgraph=True`` (so a graph break fails
the test) and trained for a few SGD steps beside an identical eager copy; outputs, gradients, parameters and every
buffer (running statistics, blended-σ's σ_prev, the batch counter) must agree to float32 rounding, and so must a
compiled eval forward. Autocast: the layers behave as ``nn.BatchNorm2d`` does under ``torch.autocast('cpu',
torch.bfloat16)`` (a bf16 input gives a bf16 output and bf16 input gradient, parameters and their gradients stay
float32), and their statistics are float32: they equal the float32 layer's on the same bf16 values.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import timm_bninit as tb
from timm_bninit import norm_kernels

STEPS = 3  # blended-σ's first step has no σ_prev; later ones do, and both branches of its backward must match


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), tb.RepresentativeBatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), tb.InstanceEnhancementBatchNormAct2d(4, momentum=None),
        nn.Conv2d(4, 4, 1), tb.RepresentativeBatchNormAct2d(4, identity_init=True),
        nn.Conv2d(4, 4, 1), tb.InstanceEnhancementBatchNorm2d(4, identity_init=True),
        nn.Conv2d(4, 4, 1), tb.BlendedStdBatchNorm2d(4, prev_std_weight=0.5),
    )
    with torch.no_grad():  # calibration parameters away from their init, so every term of the backward matters
        for name, param in model.named_parameters():
            if not name.startswith(("0.", "3.", "5.", "7.", "9.")):
                param.add_(0.5 * torch.randn_like(param))
    return model.train()


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # float32, reordered reductions: relative to the tensor's own scale, with a floor of 1e-6 because a conv bias
    # before a norm layer has an exact gradient of 0, of which both sides compute only rounding noise (~1e-8)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-5 * scale, 1e-6), msg=what)


def compare_training(backend: str) -> None:
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = 2.0 * torch.randn(4, 3, 8, 8, generator=gen) + 0.5
        target = torch.randn(4, 4, 8, 8, generator=gen)
        outputs = []
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.zero_grad()
            outputs.append(model(x))
            (outputs[-1] - target).square().mean().backward()
        assert_close_scaled(outputs[1], outputs[0], f"step {step} output")
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close_scaled(p_compiled.grad, p_eager.grad, f"step {step} ∂L/∂{name}")
        eager_opt.step()
        compiled_opt.step()
    eager_buffers = dict(eager.named_buffers())
    for name, buffer in compiled_model.named_buffers():
        if buffer.dtype == torch.int64:
            assert torch.equal(buffer, eager_buffers[name]), name
        else:
            assert_close_scaled(buffer, eager_buffers[name], name)
    assert eager_buffers["10.prev_std"].gt(0).all()  # σ_prev was in play
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        assert_close_scaled(compiled(x), eager(x), "eval output")


def test_compiled_training_equals_eager_aot_eager():
    compare_training("aot_eager")


@pytest.mark.slow
def test_compiled_training_equals_eager_inductor():
    # inductor generates and builds C++ kernels: ~1 min on a shared 2-core machine
    compare_training("inductor")


def test_read_state_snapshot_is_saved_not_recomputed():
    # the work-around for the partitioner recomputing reads of a buffer after the forward wrote it: blended-σ alone,
    # the case it exists for (first step without σ_prev; the compiled backward must not see the step's own σ_B)
    torch.manual_seed(0)
    eager = tb.BlendedStdBatchNorm2d(3, prev_std_weight=0.5).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    x = 3.0 * torch.randn(4, 3, 5, 5) + 1.0
    weights = torch.randn(4, 3, 5, 5)
    grads = []
    for layer in (eager, compiled):
        inputs = x.clone().requires_grad_()
        (layer(inputs) * weights).sum().backward()
        grads.append(inputs.grad)
    assert_close_scaled(grads[1], grads[0], "∂L/∂x")
    eager_state = norm_kernels.read_state(eager.prev_std)
    assert eager_state is eager.prev_std  # eager: no copy


# ---- CPU bf16 autocast -------------------------------------------------------------------------------------------

LAYERS = {
    "rbn": tb.RepresentativeBatchNorm2d,
    "rbn_act": tb.RepresentativeBatchNormAct2d,
    "iebn": tb.InstanceEnhancementBatchNorm2d,
    "iebn_unit": functools.partial(tb.InstanceEnhancementBatchNorm2d, identity_init=True),
    "blend": functools.partial(tb.BlendedStdBatchNorm2d, prev_std_weight=0.5),
}


def autocast_step(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """conv → layer under CPU bf16 autocast, two training steps; the conv's bf16 outputs and the layer's outputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    seen = []
    for _ in range(2):
        x = 2.0 * torch.randn(4, 3, 10, 10) + 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = conv(x)
            features.retain_grad()
            y = layer(features)
        y.float().square().sum().backward()
        seen.append((features.detach(), y, features.grad))
    return seen


@pytest.mark.parametrize("kind", list(LAYERS))
def test_autocast_matches_batchnorm_dtypes_and_keeps_float32_statistics(kind, monkeypatch):
    moments_dtypes = []
    plane_moments = norm_kernels.plane_moments

    def recording_moments(x, stats_dtype):
        mean_nc, var_nc = plane_moments(x, stats_dtype)
        moments_dtypes.append((x.dtype, mean_nc.dtype, var_nc.dtype))
        return mean_nc, var_nc

    monkeypatch.setattr(norm_kernels, "plane_moments", recording_moments)
    bn_seen = autocast_step(nn.BatchNorm2d(4).train())
    layer = LAYERS[kind](4).train()
    seen = autocast_step(layer)
    for (features, y, dx), (_, bn_y, bn_dx) in zip(seen, bn_seen):
        assert features.dtype == torch.bfloat16
        assert y.dtype == bn_y.dtype == torch.bfloat16 and dx.dtype == bn_dx.dtype == torch.bfloat16
    assert moments_dtypes == [(torch.bfloat16, torch.float32, torch.float32)] * 2
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in layer.buffers())

    # the float32 layer on the same bf16 values: equal statistics (bf16 ones would be off by ~1e-3 relative), and
    # the bf16 output is its output rounded to bf16
    reference = LAYERS[kind](4).train()
    for features, y, _ in seen:
        want = reference(features.float())
        torch.testing.assert_close(y.float(), want, rtol=2 ** -8, atol=2 ** -8 * want.abs().max().item())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[name], buffer, rtol=1e-6, atol=1e-7, msg=name)
