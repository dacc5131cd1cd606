"""The calibrating layers (their hand-written autograd Function, and the autograd path) under torch.compile and CPU
bf16 autocast.

Compiled: a small conv net with one calibrating layer per registered code path, and a variant without a backward of
its own, is compiled with ``fullgraph=True`` (so a graph break fails the test) and trained for a few SGD steps beside
an identical eager copy, in float64; outputs, gradients, parameters and every buffer (running statistics, blended-σ's
σ_prev, the batch counter) must agree to float64 rounding, and so must a compiled eval forward. Autocast: the layers
behave as ``nn.BatchNorm2d`` does under ``torch.autocast('cpu', torch.bfloat16)`` (a bf16 input gives a bf16 output
and bf16 input gradient, parameters and their gradients stay float32), and their statistics are float32: they equal
the float32 layer's on the same bf16 values.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_user_variant import ScaledBatchNorm2d
from torch import nn
from variants import distinct_forms, factory, names

import timm_bninit as tb
from timm_bninit import norm_kernels

STEPS = 3  # blended-σ's first step has no σ_prev; later ones do, and both branches of its backward must match


def rounding_tolerance(dtype: torch.dtype, terms: int, layers: int) -> float:
    """How far two evaluations of the same formulas in other orders (compiled: fused kernels, reordered reductions)
    can drift apart, relative to the magnitudes involved: reordering a sum of n terms moves it by at most about
    n·ε·Σ|terms|, and each layer adds its own; ×4 for room. Derived from the computation, so it holds whatever the
    CPU's vector width or summation order, while a wrong gradient term costs far more (see the tests' docstrings)."""
    return 4 * terms * layers * torch.finfo(dtype).eps


# the model below, in float64: sums over at most 4·8·8 = 256 values per channel, through 12 layers (≈ 2.7e-12)
TOLERANCE = rounding_tolerance(torch.float64, terms=4 * 8 * 8, layers=12)


def make_model() -> nn.Module:
    """Conv → calibrating layer, once per registered code path (fused and plain in turn, one with a cumulative running
    average), then a variant that trains through autograd."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for index, name in enumerate(distinct_forms("calibrated")):
        options = {"momentum": None} if index == 1 else {}
        layers += [nn.Conv2d(channels, 4, 3 if index == 0 else 1, padding=1 if index == 0 else 0),
                   factory(name, fused=index % 2 == 1)(4, **options)]
        channels = 4
    layers += [nn.Conv2d(4, 4, 1), ScaledBatchNorm2d(4)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # calibration parameters away from their init, so every term of the backward matters
        for module in model:
            if isinstance(module, tb.BatchNormVariant):
                for param in module.parameters():
                    param.add_(0.5 * torch.randn_like(param))
    return model.train()


def assert_close_rounding(got: torch.Tensor, want: torch.Tensor, scale: float, what: str,
                          tolerance: float = TOLERANCE) -> None:
    """Equal up to ``tolerance`` relative to ``scale``, the largest magnitude of the quantity across the model: the
    gradient of a conv bias before a norm layer is exactly 0, and both sides compute rounding noise on the scale of
    the other gradients."""
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * scale, msg=what)


def largest(tensors) -> float:
    return max(t.abs().max().item() for t in tensors)


def compare_training(backend: str) -> None:
    """A compiled backward that differs from eager fails this: one gradient term of the compiled Function off by
    1e-8 relative (≈ 4000 × TOLERANCE) fails at step 0, and so does reading blended-σ's σ_prev after the forward
    overwrote it (``read_state`` bypassed), at step 1, with either backend."""
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = 2.0 * torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) + 0.5
        target = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
        outputs = []
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.zero_grad()
            outputs.append(model(x))
            (outputs[-1] - target).square().mean().backward()
        assert_close_rounding(outputs[1], outputs[0], largest(outputs[:1]), f"step {step} output")
        scale = largest(p.grad for p in eager.parameters())
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close_rounding(p_compiled.grad, p_eager.grad, scale, f"step {step} ∂L/∂{name}")
        eager_opt.step()
        compiled_opt.step()
    eager_buffers = dict(eager.named_buffers())
    scale = largest(b for b in eager_buffers.values() if b.is_floating_point())
    for name, buffer in compiled_model.named_buffers():
        if buffer.dtype == torch.int64:
            assert torch.equal(buffer, eager_buffers[name]), name
        else:
            assert_close_rounding(buffer, eager_buffers[name], scale, name)
    assert all(b.gt(0).all() for name, b in eager_buffers.items() if name.endswith("prev_std"))  # σ_prev in play
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = eager(x)
        assert_close_rounding(compiled(x), want, largest([want]), "eval output")


def test_compiled_training_equals_eager_aot_eager():
    compare_training("aot_eager")


@pytest.mark.slow
def test_compiled_training_equals_eager_inductor():
    # inductor generates and builds C++ kernels: ~1 min on a shared 2-core machine
    compare_training("inductor")


def test_read_state_snapshot_is_saved_not_recomputed():
    # the work-around for the partitioner recomputing reads of a buffer after the forward wrote it: blended-σ alone,
    # the case it exists for (first step without σ_prev; the compiled backward must not see the step's own σ_B)
    # float32, as in a run: in float64 the partitioner happens to save the value and the test could not fail
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
    tolerance = rounding_tolerance(torch.float32, terms=4 * 5 * 5, layers=1)  # ≈ 4.8e-5
    assert_close_rounding(grads[1], grads[0], largest(grads[:1]), "∂L/∂x", tolerance)
    eager_state = norm_kernels.read_state(eager.prev_std)
    assert eager_state is eager.prev_std  # eager: no copy


# ---- CPU bf16 autocast -------------------------------------------------------------------------------------------

AUTOCAST_CASES = [(name, fused) for name in names("calibrated") for fused in (False, True)]


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


@pytest.mark.parametrize(("name", "fused"), AUTOCAST_CASES, ids=[f"{n}{'_act' * f}" for n, f in AUTOCAST_CASES])
def test_autocast_matches_batchnorm_dtypes_and_keeps_float32_statistics(name, fused, monkeypatch):
    moments_dtypes = []
    plane_moments = norm_kernels.plane_moments

    def recording_moments(x, stats_dtype):
        mean_nc, var_nc = plane_moments(x, stats_dtype)
        moments_dtypes.append((x.dtype, mean_nc.dtype, var_nc.dtype))
        return mean_nc, var_nc

    monkeypatch.setattr(norm_kernels, "plane_moments", recording_moments)
    bn_seen = autocast_step(nn.BatchNorm2d(4).train())
    layer = factory(name, fused)(4).train()
    seen = autocast_step(layer)
    for (features, y, dx), (_, bn_y, bn_dx) in zip(seen, bn_seen):
        assert features.dtype == torch.bfloat16
        assert y.dtype == bn_y.dtype == torch.bfloat16 and dx.dtype == bn_dx.dtype == torch.bfloat16
    assert moments_dtypes == [(torch.bfloat16, torch.float32, torch.float32)] * 2
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in layer.buffers())

    # the float32 layer on the same bf16 values: equal statistics (bf16 ones would be off by ~1e-3 relative), and
    # the bf16 output is its output rounded to bf16
    reference = factory(name, fused)(4).train()
    for features, y, _ in seen:
        want = reference(features.float())
        torch.testing.assert_close(y.float(), want, rtol=2 ** -8, atol=2 ** -8 * want.abs().max().item())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[name], buffer, rtol=1e-6, atol=1e-7, msg=name)
