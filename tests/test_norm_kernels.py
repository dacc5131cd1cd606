"""Tests of the calibrating layers' hand-written training-mode forward/backward (``norm_kernels.PlaneAffineFunction``).

The layers compute ``y = x·A + B'`` from per-(sample, channel) moments with BN's own CPU kernels on contiguous float
inputs and portable tensor ops otherwise, and back-propagate the small (N, C) part in closed form. These tests check
that backward with float64 ``gradcheck`` on both kernel paths and in every configuration that changes the closed form,
and compare float32 / bfloat16 / chunked / non-contiguous cases with the formulas written out below.
"""

from __future__ import annotations

import functools
import math

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


def make(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> nn.Module:
    layer = LAYERS[kind](C, eps=EPS, momentum=0.3, dtype=dtype, **kwargs).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(dtype)
            param.copy_(1.0 + 0.3 * noise if name == "weight" else 0.8 * noise)
    return layer


def make_input(seed: int, n: int = 3, h: int = 2, w: int = 3, offset: float = 2.0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-(sample, channel) means and scales that differ, so every GAP term matters."""
    gen = torch.Generator().manual_seed(seed)
    means = offset * torch.randn(n, C, 1, 1, generator=gen, dtype=torch.float64)
    scales = 0.5 + 2.0 * torch.rand(n, C, 1, 1, generator=gen, dtype=torch.float64)
    return (means + scales * torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)).to(dtype)


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


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["planes", "portable"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradcheck_training_mode(kind, memory_format):
    layer = make(kind)
    if kind.startswith("blend"):
        layer.prev_std.copy_(torch.tensor([0.7, 1.9, 0.0], dtype=torch.float64))  # blended and first-step channels
    x = make_input(1).to(memory_format=memory_format)
    if kind.endswith("act"):
        x = x + 0.5  # keep values away from the ReLU kink, where finite differences are meaningless
    gradcheck_layer(layer, x)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_parameters_only(kind):
    """The input needs no gradient (first layer of a network): the parameter gradients alone are right."""
    gradcheck_layer(make(kind), make_input(2), grad_input=False)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_batch_statistics_in_eval_without_running_stats(kind):
    """track_running_stats=False uses batch statistics in eval too (and the blended layer then uses σ_B alone)."""
    layer = make(kind, track_running_stats=False).eval()
    gradcheck_layer(layer, make_input(3))


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_gradcheck_single_pixel_planes(kind):
    """H = W = 1: every plane has one value, v = 0 and the variance comes from the batch only."""
    gradcheck_layer(make(kind), make_input(4, n=5, h=1, w=1))


# ---- forward and gradients against the formulas --------------------------------------------------------------------


def forward_backward(module_or_fn, x: torch.Tensor, grad: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = module_or_fn(x)
    grads = torch.autograd.grad(y, [x, *params], grad)
    return (y.detach(), *grads)


@pytest.mark.parametrize("case", ["contiguous", "channels_last", "chunked", "expanded_grad"])
@pytest.mark.parametrize("kind", ["rbn", "rbn_unit", "iebn", "iebn_unit", "blend"])
def test_matches_formula_float64(kind, case, monkeypatch):
    layer = make(kind)
    x = make_input(5, n=4, h=5, w=6)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "chunked":
        monkeypatch.setattr(norm_kernels, "_VARIANCE_CHUNK_ELEMENTS", x[0].numel() + 1)  # one sample per chunk
    elif case == "expanded_grad":
        grad = torch.tensor(0.7, dtype=torch.float64).expand(x.shape)  # as y.sum().backward() passes it
    params = list(layer.parameters())
    got = forward_backward(layer, x, grad, params)
    want = forward_backward(functools.partial(formula, kind, layer), x, grad, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_float32_large_mean_does_not_cancel(kind):
    """Plane means 300× the spread: a one-pass E[x²] − E[x]² in float32 would lose most digits of the variance."""
    layer64 = make(kind)
    layer32 = make(kind).float()
    x = make_input(7, n=4, h=8, w=8, offset=300.0)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = forward_backward(layer64, x, grad, list(layer64.parameters()))
    got = forward_backward(layer32, x.float(), grad.float(), list(layer32.parameters()))
    for name, g, w in zip(["output", "input grad", *[n for n, _ in layer64.named_parameters()]], got, want):
        error = ((g.double() - w).abs().max() / w.abs().max()).item()
        # float32 parameter gradients sum products of |x| ≈ 300 with dy, so they keep ~1e-7·300 of relative accuracy
        assert error < 1e-4, f"{kind} {name}: relative error {error:.2e}"


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_bfloat16_input_keeps_float32_statistics(kind):
    layer = make(kind, dtype=torch.float32)
    x = make_input(9, n=4, h=6, w=6, dtype=torch.float32).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = formula(kind, layer, x.float())
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_output_is_not_a_view_so_inplace_activation_works(kind):
    layer = make(kind)
    x = make_input(10).requires_grad_()
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


def test_running_statistics_follow_the_calibrated_input():
    """RBN's running statistics track x + w_m·GAP(x), computed from the plane moments without forming it."""
    layer = make("rbn")
    x = make_input(12, n=4)
    layer(x)
    calibrated = x + layer.centering_weight.detach().reshape(1, -1, 1, 1) * x.mean(dim=(2, 3), keepdim=True)
    mean = calibrated.mean(dim=(0, 2, 3))
    var = calibrated.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean, 0.3 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var, rtol=1e-12, atol=1e-12)
