"""Tests of the calibrating layers' hand-written training-mode forward/backward (``norm_kernels.PlaneAffineFunction``).

The layers compute ``y = x·A + B'`` from per-(sample, channel) moments with BN's own CPU kernels on float inputs,
on the (1, N·C, H, W) planes view of an NCHW-contiguous batch or on each (1, C, H, W) sample of a channels_last one,
and with portable tensor ops otherwise, and back-propagate the small (N, C) part in closed form. These tests check
that backward with float64 ``gradcheck`` on the three kernel paths and in every configuration that changes the closed
form, compare float32 / bfloat16 / chunked / mixed-layout cases with the formulas written out below, and check that
the output and input gradient keep the input's memory format as ``nn.BatchNorm2d``'s do.
"""

from __future__ import annotations

import functools
import math
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call

from timm_bninit import (
    BlendedStdBatchNorm2d,
    BlendedStdBatchNormAct2d,
    InstanceEnhancementBatchNorm2d,
    InstanceEnhancementBatchNormAct2d,
    RepresentativeBatchNorm2d,
    RepresentativeBatchNormAct2d,
    native_kernels,
    norm_kernels,
)

C = 3
EPS = 1e-3

LAYERS = {
    "rbn": RepresentativeBatchNorm2d,
    "rbn_unit": functools.partial(RepresentativeBatchNorm2d, identity_init=True),
    "rbn_noaffine": functools.partial(RepresentativeBatchNorm2d, affine=False),
    "rbn_act": RepresentativeBatchNormAct2d,
    "iebn": InstanceEnhancementBatchNorm2d,
    "iebn_unit": functools.partial(InstanceEnhancementBatchNorm2d, identity_init=True),
    "iebn_noaffine": functools.partial(InstanceEnhancementBatchNorm2d, affine=False),
    "iebn_act": InstanceEnhancementBatchNormAct2d,
    "blend": functools.partial(BlendedStdBatchNorm2d, prev_std_weight=0.3),
    "blend_noaffine": functools.partial(BlendedStdBatchNorm2d, prev_std_weight=0.3, affine=False),
    "blend_act": functools.partial(BlendedStdBatchNormAct2d, prev_std_weight=0.3),
}


def make(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, channels: int = C, **kwargs) -> nn.Module:
    layer = LAYERS[kind](channels, eps=EPS, dtype=dtype, **{"momentum": 0.3, **kwargs}).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(dtype)
            param.copy_(1.0 + 0.3 * noise if name == "weight" else 0.8 * noise)
    return layer


def make_input(seed: int, n: int = 3, h: int = 2, w: int = 3, offset: float = 2.0,
               dtype: torch.dtype = torch.float64, channels: int = C) -> torch.Tensor:
    """Per-(sample, channel) means and scales that differ, so every GAP term matters."""
    gen = torch.Generator().manual_seed(seed)
    means = offset * torch.randn(n, channels, 1, 1, generator=gen, dtype=torch.float64)
    scales = 0.5 + 2.0 * torch.rand(n, channels, 1, 1, generator=gen, dtype=torch.float64)
    return (means + scales * torch.randn(n, channels, h, w, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.fixture(autouse=True, params=["native", "stock"])
def kernels(request, monkeypatch) -> str:
    """Every test twice: with the C plane kernels (``native_kernels``, the default on a CPU with a C compiler) and
    with BN's stock kernels and the closed form (the path without a compiler, under torch.compile and with
    synchronised statistics)."""
    if request.param == "stock":
        monkeypatch.setattr(native_kernels, "usable", lambda x, *running: False)
    elif native_kernels.library() is None:
        if any(shutil.which(name) for name in ("cc", "gcc", "clang")):
            pytest.fail("a C compiler is installed but the plane kernels did not build (see the warning)")
        pytest.skip("no C compiler: the C plane kernels cannot be built here")
    return request.param


# the three ways the kernels run, by the input's layout: BN's kernels on the planes view of an NCHW-contiguous batch,
# BN's kernels on each sample of a channels_last batch, the portable tensor ops on anything else
PATHS = ("planes", "samples", "portable")


def laid_out(x: torch.Tensor, path: str) -> torch.Tensor:
    """The same values, in the memory layout that takes ``path``."""
    if path == "planes":
        return x.contiguous()
    if path == "samples":
        return x.to(memory_format=torch.channels_last)
    return x.transpose(2, 3).contiguous().transpose(2, 3)  # W-major planes: contiguous in neither format


@pytest.mark.parametrize("path", PATHS)
def test_layouts_take_the_path_they_are_named_for(path):
    want = {"planes": torch.contiguous_format, "samples": torch.channels_last, "portable": None}[path]
    assert norm_kernels._kernel_layout(laid_out(make_input(0), path)) == want


# ---- the formulas (docs/methods.md §2-§4), training mode, written out with plain tensor ops ------------------


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _bn(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


def formula(kind: str, layer: nn.Module, x: torch.Tensor, prev_std: torch.Tensor | None = None) -> torch.Tensor:
    p = dict(layer.named_parameters())
    gamma = _channel(p["weight"]) if "weight" in p else 1.0
    beta = _channel(p["bias"]) if "bias" in p else 0.0
    gap = functools.partial(torch.mean, dim=(2, 3), keepdim=True)
    if kind.startswith("rbn"):
        x_hat = _bn(x + _channel(p["centering_weight"]) * gap(x))
        s = torch.sigmoid(_channel(p["scaling_weight"]) * gap(x_hat) + _channel(p["scaling_bias"]))
        y = gamma * (s / _sigmoid(1.0) if layer.identity_init else s) * x_hat + beta
    elif kind.startswith("iebn"):
        a = torch.sigmoid(_channel(p["instance_weight"]) * gap(x) + _channel(p["instance_bias"]))
        y = _bn(x) * (gamma * (a / _sigmoid(-1.0) if layer.identity_init else a)) + beta
    else:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = torch.sqrt(((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True) + EPS)
        if prev_std is not None:
            std = layer.prev_std_weight * _channel(prev_std) + (1.0 - layer.prev_std_weight) * std
        y = (x - mean) / std + beta
    return torch.relu(y) if kind.endswith("act") else y


# ---- float64 gradcheck on both kernel paths ----------------------------------------------------------------------


def gradcheck_layer(layer: nn.Module, x: torch.Tensor, grad_input: bool = True) -> None:
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    prev_std = layer.prev_std.clone() if hasattr(layer, "prev_std") else None

    def forward(inp, *param_values):
        if prev_std is not None:
            layer.prev_std.copy_(prev_std)  # the blended layer's state changes with every call
        return functional_call(layer, dict(zip(names, param_values)), (inp,))

    assert torch.autograd.gradcheck(forward, (x.requires_grad_(grad_input), *params), eps=1e-6, atol=1e-6,
                                    rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradcheck_training_mode(kind, path):
    layer = make(kind)
    if kind.startswith("blend"):
        layer.prev_std.copy_(torch.tensor([0.7, 1.9, 0.0], dtype=torch.float64))  # blended and first-step channels
    x = laid_out(make_input(1), path)
    if kind.endswith("act"):
        x = x + 0.5  # keep values away from the ReLU kink, where finite differences are meaningless
    gradcheck_layer(layer, x)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_parameters_only(kind):
    """The input needs no gradient (first layer of a network): the parameter gradients alone are right."""
    gradcheck_layer(make(kind), make_input(2), grad_input=False)


@pytest.mark.parametrize("path", ["planes", "samples"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_batch_statistics_in_eval_without_running_stats(kind, path):
    """track_running_stats=False uses batch statistics in eval too (and the blended layer then uses σ_B alone)."""
    layer = make(kind, track_running_stats=False).eval()
    gradcheck_layer(layer, laid_out(make_input(3), path))


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_single_pixel_planes(kind):
    """H = W = 1: every plane has one value, v = 0 and the variance comes from the batch only."""
    gradcheck_layer(make(kind), make_input(4, n=5, h=1, w=1))


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_channels_last_single_sample_of_two_pixels(kind):
    """The per-sample kernels at their smallest: one sample, planes of two values (fewer rows than BN's threads)."""
    gradcheck_layer(make(kind), laid_out(make_input(4, n=1, h=1, w=2), "samples"))


# ---- forward and gradients against the formulas --------------------------------------------------------------------


def forward_backward(module_or_fn, x: torch.Tensor, grad: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = module_or_fn(x)
    grads = torch.autograd.grad(y, [x, *params], grad)
    return (y.detach(), *grads)


# (input layout, gradient layout or "expanded"): every kernel path, the chunked variance, and gradients that reach the
# layer in another layout than its input (then the backward sums take the portable ops)
FORMULA_CASES = {
    "planes": ("planes", "planes"),
    "samples": ("samples", "samples"),
    "portable": ("portable", "portable"),
    "chunked": ("planes", "planes"),
    "expanded_grad": ("planes", "expanded"),
    "samples_expanded_grad": ("samples", "expanded"),
    "samples_input_planes_grad": ("samples", "planes"),
    "planes_input_samples_grad": ("planes", "samples"),
}


@pytest.mark.parametrize("case", list(FORMULA_CASES))
@pytest.mark.parametrize("kind", ["rbn", "rbn_unit", "iebn", "iebn_unit", "blend"])
def test_matches_formula_float64(kind, case, monkeypatch):
    layer = make(kind)
    input_path, grad_path = FORMULA_CASES[case]
    x = laid_out(make_input(5, n=4, h=5, w=6), input_path)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    if case == "chunked":
        monkeypatch.setattr(norm_kernels, "_VARIANCE_CHUNK_ELEMENTS", x[0].numel() + 1)  # one sample per chunk
    if grad_path == "expanded":
        grad = torch.tensor(0.7, dtype=torch.float64).expand(x.shape)  # as y.sum().backward() passes it
    else:
        grad = laid_out(grad, grad_path)
    params = list(layer.parameters())
    got = forward_backward(layer, x, grad, params)
    want = forward_backward(functools.partial(formula, kind, layer), x, grad, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 110, 100), (2, 2050, 2, 3)], ids=["row_chunks", "column_blocks"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_large_channels_last_samples_match_formula_float64(kind, shape):
    """channels_last samples of more rows than the C kernels' moments take in one chunk (256 KiB: 10,922 rows of 3
    float64 channels; the chunks' moments are combined) or wider than one block of columns (2,048): the formulas, to
    float64 rounding."""
    n, channels, h, w = shape
    layer = make(kind, channels=channels)
    x = laid_out(make_input(18, n=n, h=h, w=w, channels=channels), "samples")
    grad = laid_out(torch.randn(x.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64), "samples")
    params = list(layer.parameters())
    got = forward_backward(layer, x, grad, params)
    want = forward_backward(functools.partial(formula, kind, layer), x, grad, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _record_native_calls(monkeypatch, *names: str) -> list[str]:
    calls = []

    def recording(name, function):
        def call(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return call

    for name in names:
        monkeypatch.setattr(native_kernels, name, recording(name, getattr(native_kernels, name)))
    return calls


def test_channels_last_runs_batchnorm_kernels_per_sample(monkeypatch, kernels):
    """A channels_last batch takes the C kernels when they are built (one forward and one backward call for the
    whole batch), else BN's kernels sample by sample (the fast stock path), never the portable ops."""
    calls = []
    update_stats = torch.batch_norm_update_stats

    def recording_update_stats(sample, *args):
        calls.append(("stats", tuple(sample.shape), sample.is_contiguous(memory_format=torch.channels_last)))
        return update_stats(sample, *args)

    grad_sums = norm_kernels._bn_grad_sums

    def recording_grad_sums(grad_y, sample, *args):
        calls.append(("grad sums", tuple(sample.shape), grad_y.is_contiguous(memory_format=torch.channels_last)))
        return grad_sums(grad_y, sample, *args)

    monkeypatch.setattr(torch, "batch_norm_update_stats", recording_update_stats)
    monkeypatch.setattr(norm_kernels, "_bn_grad_sums", recording_grad_sums)
    native_calls = _record_native_calls(monkeypatch, "iebn_forward", "backward")
    x = laid_out(make_input(13, n=4, h=5, w=6), "samples").requires_grad_()
    make("iebn")(x).backward(laid_out(torch.randn(x.shape, dtype=torch.float64), "samples"))
    if kernels == "native":
        assert (calls, native_calls) == ([], ["iebn_forward", "backward"])
    else:
        assert native_calls == []
        assert calls == [("stats", (1, C, 5, 6), True)] * 4 + [("grad sums", (1, C, 5, 6), True)] * 4


def test_channels_last_blend_runs_batchnorm_kernels_on_the_whole_batch(monkeypatch, kernels):
    """Blended σ's coefficients are per channel: its channels_last step is one C forward and backward call, or BN's
    statistics and BN's own backward, each called once on the whole batch."""
    calls = []
    update_stats = torch.batch_norm_update_stats
    step_backward = norm_kernels._batchnorm_step_backward

    def recording_update_stats(x, *args):
        calls.append(("stats", tuple(x.shape)))
        return update_stats(x, *args)

    def recording_step_backward(ctx, grad_y, x):
        calls.append(("backward", tuple(x.shape)))
        return step_backward(ctx, grad_y, x)

    monkeypatch.setattr(torch, "batch_norm_update_stats", recording_update_stats)
    monkeypatch.setattr(norm_kernels, "_batchnorm_step_backward", recording_step_backward)
    native_calls = _record_native_calls(monkeypatch, "blend_forward", "backward")
    layer = make("blend")
    for _ in range(2):  # the first step (σ_B alone) and a blended one
        x = laid_out(make_input(15, n=4, h=5, w=6), "samples").requires_grad_()
        layer(x).backward(laid_out(torch.randn(x.shape, dtype=torch.float64), "samples"))
    if kernels == "native":
        assert (calls, native_calls) == ([], ["blend_forward", "backward"] * 2)
    else:
        assert native_calls == []
        assert calls == [("stats", (4, C, 5, 6)), ("backward", (4, C, 5, 6))] * 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend", "rbn_act"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_output_and_input_gradient_keep_the_memory_format(kind, training, memory_format):
    """As nn.BatchNorm2d: a channels_last input gives a channels_last output and input gradient, NCHW gives NCHW."""
    x = make_input(14, n=4, h=5, w=6).to(memory_format=memory_format).requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64).to(memory_format=memory_format)
    layer = make(kind).train(training)
    y = layer(x)
    y.backward(grad)
    bn = nn.BatchNorm2d(C, dtype=torch.float64).train(training)
    bn_x = x.detach().clone().requires_grad_()
    bn_y = bn(bn_x)
    bn_y.backward(grad)
    for got, want in ((y, bn_y), (x.grad, bn_x.grad)):
        assert got.is_contiguous(memory_format=memory_format) and want.is_contiguous(memory_format=memory_format)


# (N, H, W): small planes, and channels_last samples of more rows than the C kernels' moments take in one chunk
# (256 KiB: 21,845 rows of 3 float32 channels), whose chunks' moments are combined
LARGE_MEAN_SIZES = {"one_chunk": (4, 8, 8), "chunks": (2, 150, 150)}


@pytest.mark.parametrize("size", list(LARGE_MEAN_SIZES))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_float32_large_mean_does_not_cancel(kind, path, size):
    """Plane means 300× the spread: a one-pass E[x²] − E[x]² in float32 would lose most digits of the variance."""
    layer64 = make(kind)
    layer32 = make(kind).float()
    n, height, width = LARGE_MEAN_SIZES[size]
    x = laid_out(make_input(7, n=n, h=height, w=width, offset=300.0), path)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = forward_backward(layer64, x, grad, list(layer64.parameters()))
    got = forward_backward(layer32, x.float(), grad.float(), list(layer32.parameters()))
    for name, g, w in zip(["output", "input grad", *[n for n, _ in layer64.named_parameters()]], got, want):
        error = ((g.double() - w).abs().max() / w.abs().max()).item()
        # float32 parameter gradients sum products of |x| ≈ 300 with dy, so they keep ~1e-7·300 of relative accuracy
        # over 64 values; the roundings of a sum of H·W values add up as a random walk, √(H·W) of them
        assert error < 1e-4 * max(1.0, math.sqrt(height * width / 64)), f"{kind} {name}: relative error {error:.2e}"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_bfloat16_input_keeps_float32_statistics(kind, memory_format):
    layer = make(kind, dtype=torch.float32)
    x = make_input(9, n=4, h=6, w=6, dtype=torch.float32).bfloat16().to(memory_format=memory_format)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = formula(kind, layer, x.float())
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", ["planes", "samples"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_output_is_not_a_view_so_inplace_activation_works(kind, path):
    layer = make(kind)
    x = laid_out(make_input(10), path).requires_grad_()
    y = layer(x)
    assert y._base is None
    torch.relu_(y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["rbn", "iebn"])
def test_backward_twice_with_retain_graph(kind):
    layer = make(kind)
    x = make_input(11).requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad, retain_graph=True)
    first = [x.grad.clone(), *[p.grad.clone() for p in layer.parameters()]]
    y.backward(grad)
    for before, after in zip(first, [x.grad, *[p.grad for p in layer.parameters()]]):
        torch.testing.assert_close(after, 2 * before)


@pytest.mark.parametrize("buffers", [torch.float64, torch.float32], ids=["same_dtype", "float32_buffers"])
@pytest.mark.parametrize("momentum", [0.3, 0.8, None], ids=["small", "large", "cumulative"])
@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_running_statistics_update_as_batchnorm_defines_it(kind, momentum, buffers, kernels):
    """Two training steps on float64 batches: each running statistic is r ← (1 − w)·r + w·b with b the batch's mean
    and unbiased variance (of x + w_m·GAP(x) for RBN) and w the momentum, or 1/n for the cumulative average. The C
    step updates buffers of the batch's dtype itself (torch.lerp's two formulas switch at w = 0.5, so 0.8 takes the
    other); with buffers of another dtype (a float32 layer fed float64) the step takes the Python closed form."""
    layer = make(kind, momentum=momentum)
    if buffers != torch.float64:
        layer.running_mean, layer.running_var = (b.to(buffers) for b in (layer.running_mean, layer.running_var))
    want_mean, want_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step, seed in enumerate((16, 17), start=1):
        x = laid_out(make_input(seed, n=4), "samples")
        assert layer._native_step(x) == (kernels == "native" and buffers == x.dtype)
        layer(x)
        if kind == "rbn":
            x = x + layer.centering_weight.detach().reshape(1, -1, 1, 1) * x.mean(dim=(2, 3), keepdim=True)
        weight = 1.0 / step if momentum is None else momentum
        want_mean = (1 - weight) * want_mean + weight * x.mean(dim=(0, 2, 3))
        want_var = (1 - weight) * want_var + weight * x.var(dim=(0, 2, 3), unbiased=True)
    # float64 buffers: a few roundings of values of order 1; float32 buffers: their own rounding, 2⁻²⁴ relative
    tolerance = 1e-12 if buffers == torch.float64 else 4 * 2.0**-24
    assert layer.running_mean.dtype == layer.running_var.dtype == buffers
    torch.testing.assert_close(layer.running_mean.double(), want_mean, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(layer.running_var.double(), want_var, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("path", PATHS)
def test_running_statistics_follow_the_calibrated_input(path):
    """RBN's running statistics track x + w_m·GAP(x), computed from the plane moments without forming it."""
    layer = make("rbn")
    x = laid_out(make_input(12, n=4), path)
    layer(x)
    calibrated = x + layer.centering_weight.detach().reshape(1, -1, 1, 1) * x.mean(dim=(2, 3), keepdim=True)
    mean = calibrated.mean(dim=(0, 2, 3))
    var = calibrated.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean, 0.3 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var, rtol=1e-12, atol=1e-12)
