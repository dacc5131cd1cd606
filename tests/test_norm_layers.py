"""Unit tests of the timm-bninit norm layers against the formulas of docs/methods.md §1-§5.

Every numerical expectation is written out below with plain tensor ops (``reference_*`` helpers); a layer is never
compared with itself or with another instance of itself. Numerics run in float64 with non-default values for every
parameter, and ``eps``/``momentum`` away from their defaults so that where ε sits and which momentum is used show.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.func import functional_call

import timm_bninit
from timm_bninit import (
    VARIANT_TYPES,
    BatchNormGamma2d,
    BatchNormUniformGamma2d,
    BlendedStdBatchNorm2d,
    InstanceEnhancementBatchNorm2d,
    RepresentativeBatchNorm2d,
)

C = 5
EPS = 1e-3  # large enough that ε inside vs outside the square root differs far above float64 tolerance
MOMENTUM = 0.3
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
SIGMOID_1 = 1.0 / (1.0 + math.exp(-1.0))  # RBN's effective initial γ, ≈ 0.731
SIGMOID_M1 = 1.0 / (1.0 + math.exp(1.0))  # IEBN's effective initial γ, ≈ 0.269

# name -> constructor of a float64 layer with C channels; the ``_unit`` variants start as the exact identity
LAYERS = {
    "gamma": functools.partial(BatchNormGamma2d, gamma_init=0.25),
    "uniform": BatchNormUniformGamma2d,
    "rbn": RepresentativeBatchNorm2d,
    "rbn_unit": functools.partial(RepresentativeBatchNorm2d, identity_init=True),
    "iebn": InstanceEnhancementBatchNorm2d,
    "iebn_unit": functools.partial(InstanceEnhancementBatchNorm2d, identity_init=True),
    "blend": functools.partial(BlendedStdBatchNorm2d, prev_std_weight=0.3),
}
CALIBRATED = ("rbn", "iebn", "blend")


def make(kind: str, **kwargs) -> nn.BatchNorm2d:
    kwargs = {"eps": EPS, "momentum": MOMENTUM, "dtype": torch.float64, **kwargs}
    return LAYERS[kind](C, **kwargs)


def make_input(seed: int, n: int = 4, h: int = 5, w: int = 6) -> torch.Tensor:
    """Float64 input whose per-(sample, channel) means and scales differ, so GAP terms matter."""
    gen = torch.Generator().manual_seed(seed)
    offset = 2.0 * torch.randn(n, C, 1, 1, generator=gen, dtype=torch.float64)
    scale = 0.5 + torch.rand(n, C, 1, 1, generator=gen, dtype=torch.float64) * 2.0
    return offset + scale * torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default values for every parameter (γ around 1, β and the calibration parameters around 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            values = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_(1.0 + 0.3 * values if name == "weight" else 0.8 * values)
    return layer


def set_running_stats(layer: nn.BatchNorm2d, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(0.5 + torch.rand(C, generator=gen, dtype=torch.float64) * 2.0)


# ---- the formulas, written out ------------------------------------------------------------------------------------


def per_channel(t: torch.Tensor) -> torch.Tensor:
    return t[None, :, None, None]


def gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W)."""
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - per_channel(mean)) ** 2).mean(dim=(0, 2, 3))
    return mean, var


def normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return (x - per_channel(mean)) / torch.sqrt(per_channel(var) + eps)


def reference_bn(x, gamma, beta, stats=None):
    mean, var = batch_mean_var(x) if stats is None else stats
    return per_channel(gamma) * normalise(x, mean, var) + per_channel(beta)


def reference_rbn(x, gamma, beta, w_m, w_v, w_b, stats=None, identity_init=False):
    x_c = x + per_channel(w_m) * gap(x)
    mean, var = batch_mean_var(x_c) if stats is None else stats
    x_hat = normalise(x_c, mean, var)
    s = torch.sigmoid(per_channel(w_v) * gap(x_hat) + per_channel(w_b))
    if identity_init:
        s = s / SIGMOID_1
    return per_channel(gamma) * s * x_hat + per_channel(beta)


def reference_iebn(x, gamma, beta, inst_w, inst_b, stats=None, identity_init=False):
    a = torch.sigmoid(per_channel(inst_w) * gap(x) + per_channel(inst_b))
    if identity_init:
        a = a / SIGMOID_M1
    mean, var = batch_mean_var(x) if stats is None else stats
    return normalise(x, mean, var) * (per_channel(gamma) * a) + per_channel(beta)


def reference_blend(x, beta, alpha, prev_std=None):
    mean, var = batch_mean_var(x)
    batch_std = torch.sqrt(var + EPS)
    std = batch_std if prev_std is None else alpha * prev_std + (1.0 - alpha) * batch_std
    return (x - per_channel(mean)) / per_channel(std) + per_channel(beta), batch_std


def reference_forward(kind: str, layer: nn.Module, x: torch.Tensor, stats=None) -> torch.Tensor:
    """The layer's formula evaluated from its parameter values (``stats``: running statistics in eval)."""
    p = {name: t.detach() for name, t in layer.named_parameters()}
    if kind in ("gamma", "uniform"):
        return reference_bn(x, p["weight"], p["bias"], stats)
    if kind.startswith("rbn"):
        return reference_rbn(x, p["weight"], p["bias"], p["centering_weight"], p["scaling_weight"],
                             p["scaling_bias"], stats, identity_init=kind.endswith("unit"))
    if kind.startswith("iebn"):
        return reference_iebn(x, p["weight"], p["bias"], p["instance_weight"], p["instance_bias"], stats,
                              identity_init=kind.endswith("unit"))
    raise AssertionError(kind)


def eval_stats(layer: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.running_mean.clone(), layer.running_var.clone()


# ---- 1. forward against the formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma_init", [0.01, 0.1, 0.37, 1.0])
def test_gamma_init_values_and_forward_is_plain_bn(gamma_init):
    layer = BatchNormGamma2d(C, gamma_init=gamma_init, eps=EPS, dtype=torch.float64)
    assert torch.all(layer.weight == gamma_init)
    assert torch.all(layer.bias == 0)
    assert layer.gamma_init_value == gamma_init
    assert layer.gamma_lr_div == 100.0
    x = make_input(0)
    torch.testing.assert_close(layer.train()(x), gamma_init * normalise(x, *batch_mean_var(x)), **TIGHT)
    set_running_stats(layer)
    rm, rv = eval_stats(layer)
    torch.testing.assert_close(layer.eval()(x), gamma_init * normalise(x, rm, rv), **TIGHT)


def test_uniform_gamma_init():
    torch.manual_seed(0)
    layer = BatchNormUniformGamma2d(64, dtype=torch.float64)
    assert torch.all(layer.weight >= 0) and torch.all(layer.weight < 1)
    assert layer.weight.unique().numel() > 1
    assert torch.all(layer.bias == 0)
    assert layer.gamma_init_value is None
    # U(0, 1): 64 draws have a mean near 0.5 (6σ ≈ 0.22)
    assert abs(layer.weight.mean().item() - 0.5) < 0.22


@pytest.mark.parametrize("kind", ["gamma", "uniform", "rbn", "rbn_unit", "iebn", "iebn_unit"])
def test_forward_train_matches_formula(kind):
    layer = randomize(make(kind)).train()
    x = make_input(1)
    torch.testing.assert_close(layer(x), reference_forward(kind, layer, x), **TIGHT)


@pytest.mark.parametrize("kind", ["gamma", "uniform", "rbn", "rbn_unit", "iebn", "iebn_unit"])
def test_forward_eval_matches_formula_with_running_stats(kind):
    layer = randomize(make(kind))
    set_running_stats(layer)
    stats = eval_stats(layer)
    x = make_input(2)
    y = layer.eval()(x)
    torch.testing.assert_close(y, reference_forward(kind, layer, x, stats), **TIGHT)
    # eval reads the running statistics, it does not update them
    torch.testing.assert_close(eval_stats(layer), stats, rtol=0, atol=0)


def test_rbn_gap_of_normalised_uses_calibrated_input():
    """Centering calibration matters: with w_m ≠ 0 the result differs from RBN evaluated on the raw x."""
    layer = randomize(make("rbn")).train()
    x = make_input(3)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    without_centering = reference_rbn(x, p["weight"], p["bias"], torch.zeros(C, dtype=torch.float64),
                                      p["scaling_weight"], p["scaling_bias"])
    y = layer(x)
    assert (y - without_centering).abs().max() > 1e-3
    torch.testing.assert_close(y, reference_forward("rbn", layer, x), **TIGHT)


def test_iebn_attention_uses_raw_input_gap():
    """a = σ(γ̂·GAP(x) + β̂) on the raw input, not on x̂ (whose GAP would differ)."""
    layer = randomize(make("iebn")).train()
    x = make_input(4)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    mean, var = batch_mean_var(x)
    x_hat = normalise(x, mean, var)
    a_on_normalised = torch.sigmoid(per_channel(p["instance_weight"]) * gap(x_hat) + per_channel(p["instance_bias"]))
    wrong = x_hat * (per_channel(p["weight"]) * a_on_normalised) + per_channel(p["bias"])
    y = layer(x)
    assert (y - wrong).abs().max() > 1e-3
    torch.testing.assert_close(y, reference_forward("iebn", layer, x), **TIGHT)


def test_blend_first_step_then_previous_batch_std():
    alpha = 0.3
    layer = randomize(make("blend")).train()
    beta = layer.bias.detach().clone()
    x1, x2, x3, x_eval = make_input(5), make_input(6), make_input(7), make_input(8)

    expected1, std1 = reference_blend(x1, beta, alpha)  # first step: σ_B alone
    torch.testing.assert_close(layer(x1), expected1, **TIGHT)
    torch.testing.assert_close(layer.prev_std, std1, **TIGHT)

    # an eval forward in between neither uses nor changes σ_prev
    layer.eval()(x_eval)
    torch.testing.assert_close(layer.prev_std, std1, **TIGHT)

    layer.train()
    expected2, std2 = reference_blend(x2, beta, alpha, prev_std=std1)
    torch.testing.assert_close(layer(x2), expected2, **TIGHT)
    expected3, _ = reference_blend(x3, beta, alpha, prev_std=std2)
    torch.testing.assert_close(layer(x3), expected3, **TIGHT)

    # resetting the running statistics forgets σ_prev: the next step is a first step again
    layer.reset_running_stats()
    expected_again, _ = reference_blend(x2, beta, alpha)
    torch.testing.assert_close(layer(x2), expected_again, **TIGHT)


def test_blend_eval_uses_running_stats_like_bn():
    layer = randomize(make("blend"))
    set_running_stats(layer)
    rm, rv = eval_stats(layer)
    with torch.no_grad():
        layer.prev_std.fill_(3.0)  # must be ignored in eval
    x = make_input(9)
    expected = (x - per_channel(rm)) / torch.sqrt(per_channel(rv) + EPS) + per_channel(layer.bias.detach())
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_blend_alpha_grid(alpha):
    layer = randomize(BlendedStdBatchNorm2d(C, prev_std_weight=alpha, eps=EPS, dtype=torch.float64)).train()
    beta = layer.bias.detach().clone()
    x1, x2 = make_input(10), make_input(11)
    _, std1 = reference_blend(x1, beta, alpha)
    layer(x1)
    torch.testing.assert_close(layer(x2), reference_blend(x2, beta, alpha, prev_std=std1)[0], **TIGHT)


FUSED = {
    "gamma": functools.partial(timm_bninit.BatchNormGammaAct2d, gamma_init=0.25),
    "uniform": timm_bninit.BatchNormUniformGammaAct2d,
    "rbn": timm_bninit.RepresentativeBatchNormAct2d,
    "iebn": timm_bninit.InstanceEnhancementBatchNormAct2d,
}


@pytest.mark.parametrize("kind", list(FUSED))
@pytest.mark.parametrize("training", [True, False])
def test_fused_variant_is_activation_of_formula(kind, training):
    layer = randomize(FUSED[kind](C, act_layer=nn.SiLU, eps=EPS, momentum=MOMENTUM, dtype=torch.float64))
    set_running_stats(layer)
    stats = None if training else eval_stats(layer)
    x = make_input(29)
    expected = torch.nn.functional.silu(reference_forward(kind, layer, x, stats))
    torch.testing.assert_close(layer.train(training)(x), expected, **TIGHT)


def test_fused_blend_is_activation_of_formula():
    layer = randomize(timm_bninit.BlendedStdBatchNormAct2d(C, prev_std_weight=0.3, act_layer=nn.SiLU, eps=EPS,
                                                          dtype=torch.float64)).train()
    beta = layer.bias.detach().clone()
    x1, x2 = make_input(30), make_input(31)
    expected1, std1 = reference_blend(x1, beta, 0.3)
    torch.testing.assert_close(layer(x1), torch.nn.functional.silu(expected1), **TIGHT)
    expected2, _ = reference_blend(x2, beta, 0.3, prev_std=std1)
    torch.testing.assert_close(layer(x2), torch.nn.functional.silu(expected2), **TIGHT)


@pytest.mark.parametrize("kind", ["rbn", "iebn"])
def test_without_affine_gamma_is_one_and_beta_zero(kind):
    layer = randomize(make(kind, affine=False)).train()
    assert layer.weight is None and layer.bias is None
    x = make_input(32)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    if kind == "rbn":
        expected = reference_rbn(x, ones, zeros, p["centering_weight"], p["scaling_weight"], p["scaling_bias"])
    else:
        expected = reference_iebn(x, ones, zeros, p["instance_weight"], p["instance_bias"])
    torch.testing.assert_close(layer(x), expected, **TIGHT)


@pytest.mark.parametrize("kind", ["rbn", "iebn"])
def test_without_running_stats_eval_uses_batch_stats(kind):
    """Like ``nn.BatchNorm2d(track_running_stats=False)``: batch statistics in both modes."""
    layer = randomize(make(kind, track_running_stats=False)).eval()
    assert layer.running_mean is None
    x = make_input(33)
    torch.testing.assert_close(layer(x), reference_forward(kind, layer, x), **TIGHT)


def test_blend_without_running_stats_eval_uses_batch_std():
    layer = randomize(make("blend", track_running_stats=False)).eval()
    x = make_input(34)
    torch.testing.assert_close(layer(x), reference_blend(x, layer.bias.detach(), 0.3)[0], **TIGHT)


@pytest.mark.parametrize("kind", ["rbn", "iebn", "blend"])
def test_float32_accuracy(kind):
    """A float32 layer stays near the float64 formula for inputs whose mean is ~1000 times their spread.

    nn.BatchNorm2d is off by ≈1e-4 here; a one-pass E[x²] − E[x]² variance in float32 would be off by ~10%.
    """
    layer = make(kind, dtype=torch.float32).train()
    x = 100.0 + 0.05 * make_input(35, n=4, h=8, w=8)
    y = layer(x.float()).double()
    mean, var = batch_mean_var(x)
    expected = normalise(x, mean, var) * getattr(layer, "initial_scale", 1.0)
    torch.testing.assert_close(y, expected, rtol=0, atol=5e-4)


def test_reset_affine_parameters_restores_init_but_not_running_stats():
    for kind, inits in [("gamma", {"weight": 0.25, "bias": 0.0}),
                        ("rbn", {"weight": 1.0, "bias": 0.0, "centering_weight": 0.0, "scaling_weight": 0.0,
                                 "scaling_bias": 1.0}),
                        ("iebn", {"weight": 1.0, "bias": 0.0, "instance_weight": 0.0, "instance_bias": -1.0})]:
        layer = randomize(make(kind))
        set_running_stats(layer)
        stats = eval_stats(layer)
        layer.reset_affine_parameters()
        for name, value in inits.items():
            assert torch.all(getattr(layer, name) == value), (kind, name)
        torch.testing.assert_close(eval_stats(layer), stats, rtol=0, atol=0)


# ---- 2. running statistics ----------------------------------------------------------------------------------------


def statistics_input(kind: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor whose batch statistics the layer tracks: RBN tracks the centring-calibrated x."""
    if kind.startswith("rbn"):
        return x + per_channel(layer.centering_weight.detach()) * gap(x)
    return x


@pytest.mark.parametrize("kind", list(LAYERS))
def test_running_stats_follow_bn_update(kind):
    layer = randomize(make(kind)).train()
    set_running_stats(layer)
    x = make_input(12)
    rm, rv = eval_stats(layer)
    mean, var = batch_mean_var(statistics_input(kind, layer, x))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    layer(x)
    torch.testing.assert_close(layer.running_mean, (1 - MOMENTUM) * rm + MOMENTUM * mean, **TIGHT)
    torch.testing.assert_close(layer.running_var, (1 - MOMENTUM) * rv + MOMENTUM * var * count / (count - 1), **TIGHT)
    assert layer.num_batches_tracked.item() == 1
    layer(make_input(13))
    assert layer.num_batches_tracked.item() == 2


@pytest.mark.parametrize("kind", list(LAYERS))
def test_running_stats_cumulative_average_when_momentum_none(kind):
    layer = randomize(make(kind, momentum=None)).train()
    x1, x2 = make_input(14), make_input(15, n=3, h=4, w=7)
    stats1 = batch_mean_var(statistics_input(kind, layer, x1))
    stats2 = batch_mean_var(statistics_input(kind, layer, x2))
    count1, count2 = 4 * 5 * 6, 3 * 4 * 7
    layer(x1)
    torch.testing.assert_close(layer.running_mean, stats1[0], **TIGHT)
    torch.testing.assert_close(layer.running_var, stats1[1] * count1 / (count1 - 1), **TIGHT)
    layer(x2)
    torch.testing.assert_close(layer.running_mean, (stats1[0] + stats2[0]) / 2, **TIGHT)
    expected_var = (stats1[1] * count1 / (count1 - 1) + stats2[1] * count2 / (count2 - 1)) / 2
    torch.testing.assert_close(layer.running_var, expected_var, **TIGHT)
    assert layer.num_batches_tracked.item() == 2


# ---- 3. initial effective scale -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "scale"), [("rbn", SIGMOID_1), ("iebn", SIGMOID_M1), ("rbn_unit", 1.0),
                                             ("iebn_unit", 1.0)])
def test_initial_effective_scale(kind, scale):
    layer = make(kind).train()
    assert math.isclose(layer.initial_scale, scale, rel_tol=1e-12)
    x = make_input(16)
    plain_bn = normalise(x, *batch_mean_var(x))
    torch.testing.assert_close(layer(x), scale * plain_bn, rtol=1e-13, atol=1e-13)
    set_running_stats(layer)
    rm, rv = eval_stats(layer)
    torch.testing.assert_close(layer.eval()(x), scale * normalise(x, rm, rv), rtol=1e-13, atol=1e-13)


def test_initial_scale_values():
    assert RepresentativeBatchNorm2d(3).initial_scale == pytest.approx(0.7310585786, abs=1e-9)
    assert InstanceEnhancementBatchNorm2d(3).initial_scale == pytest.approx(0.2689414214, abs=1e-9)
    assert RepresentativeBatchNorm2d(3, identity_init=True).initial_scale == 1.0
    assert InstanceEnhancementBatchNorm2d(3, identity_init=True).initial_scale == 1.0


def test_calibration_parameter_inits():
    rbn = RepresentativeBatchNorm2d(C)
    assert torch.all(rbn.centering_weight == 0) and torch.all(rbn.scaling_weight == 0)
    assert torch.all(rbn.scaling_bias == 1)
    assert torch.all(rbn.weight == 1) and torch.all(rbn.bias == 0)
    iebn = InstanceEnhancementBatchNorm2d(C)
    assert torch.all(iebn.instance_weight == 0) and torch.all(iebn.instance_bias == -1)
    assert torch.all(iebn.weight == 1) and torch.all(iebn.bias == 0)


# ---- 4. gradients ---------------------------------------------------------------------------------------------------


def gradcheck_layer(layer: nn.Module, x: torch.Tensor, before_call=None) -> None:
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def forward(inp, *param_values):
        if before_call is not None:
            before_call()
        return functional_call(layer, dict(zip(names, param_values)), (inp,))

    assert torch.autograd.gradcheck(forward, (x.requires_grad_(), *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["rbn", "rbn_unit", "iebn", "iebn_unit"])
def test_gradcheck_calibrated(kind):
    layer = randomize(make(kind)).train()
    assert len(list(layer.parameters())) == (5 if kind.startswith("rbn") else 4)
    gradcheck_layer(layer, make_input(17, n=2, h=3, w=3))


def test_gradcheck_blend_first_step():
    layer = randomize(make("blend")).train()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    gradcheck_layer(layer, make_input(18, n=2, h=3, w=3), before_call=layer.prev_std.zero_)
    # the first step is σ_B alone: the analytical gradient wrt x is BN's (γ = 1)
    x = make_input(18, n=2, h=3, w=3).requires_grad_()
    weights = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape)
    layer.prev_std.zero_()
    (layer(x) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (normalise(x_ref, *batch_mean_var(x_ref)) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TIGHT)


def test_gradcheck_blend_second_step_prev_std_is_constant():
    layer = randomize(make("blend")).train()
    x1 = make_input(19, n=2, h=3, w=3).requires_grad_()
    layer(x1)
    prev = layer.prev_std.detach().clone()
    assert not layer.prev_std.requires_grad and layer.prev_std.grad_fn is None
    assert torch.all(prev > 0)
    gradcheck_layer(layer, make_input(20, n=2, h=3, w=3), before_call=lambda: layer.prev_std.copy_(prev))

    # the second step's gradient wrt x2 is that of the formula with σ_prev a constant, and nothing flows to x1
    x2 = make_input(20, n=2, h=3, w=3).requires_grad_()
    layer.prev_std.copy_(prev)
    weights = torch.linspace(-1, 1, x2.numel(), dtype=x2.dtype).reshape(x2.shape)
    (layer(x2) * weights).sum().backward()
    assert x1.grad is None
    x_ref = x2.detach().clone().requires_grad_()
    (reference_blend(x_ref, layer.bias.detach(), 0.3, prev_std=prev)[0] * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x_ref.grad, **TIGHT)


def test_parameter_gradients_match_formula():
    """Autograd through the layer equals autograd through the written-out formula, for every RBN parameter."""
    layer = randomize(make("rbn")).train()
    x = make_input(21)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (layer(x) * weights).sum().backward()
    ref = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    y_ref = reference_rbn(x, ref["weight"], ref["bias"], ref["centering_weight"], ref["scaling_weight"],
                          ref["scaling_bias"])
    (y_ref * weights).sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-9, atol=1e-11, msg=name)


# ---- 5. state dicts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
def test_state_dict_round_trip(kind):
    torch.manual_seed(0)
    layer = randomize(make(kind), seed=3).train()
    for seed in (22, 23):
        layer(make_input(seed))
    fresh = make(kind)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    x = make_input(24)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))
    # train mode too: for the blend layer this exercises the saved σ_prev
    assert torch.equal(fresh.train()(x), layer.train()(x))


def plain_bn_state_dict(gamma_value: float | None = None, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(C, generator=gen, dtype=torch.float64) if gamma_value is None
                        else torch.full((C,), gamma_value, dtype=torch.float64))
        bn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(C, generator=gen, dtype=torch.float64))
        bn.num_batches_tracked.fill_(7)
    return bn.state_dict()


@pytest.mark.parametrize(("kind", "extra_inits"), [
    ("rbn", {"centering_weight": 0.0, "scaling_weight": 0.0, "scaling_bias": 1.0}),
    ("iebn", {"instance_weight": 0.0, "instance_bias": -1.0}),
    ("gamma", {}),
])
def test_standard_bn_state_dict_loads_strict(kind, extra_inits):
    state = plain_bn_state_dict()
    layer = make(kind)
    result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in state.items():
        assert torch.equal(getattr(layer, name), tensor), name
    for name, value in extra_inits.items():
        assert torch.all(getattr(layer, name) == value), name
    # the loaded layer is the BN it came from, times its initial effective scale (1 for the γ-init variant)
    x = make_input(25)
    stats = (state["running_mean"], state["running_var"])
    scale = getattr(layer, "initial_scale", 1.0)
    expected = scale * per_channel(state["weight"]) * normalise(x, *stats) + per_channel(state["bias"])
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


def test_blend_has_no_gamma_parameter():
    layer = make("blend")
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" in dict(layer.named_buffers())
    assert "weight" not in layer.state_dict()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert "prev_std" in layer.state_dict()


def test_blend_loads_standard_bn_state_dict():
    # γ == 1: nothing is lost, no warning
    layer = make("blend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(plain_bn_state_dict(gamma_value=1.0), strict=True)
    # γ != 1: loads strictly, but says that γ was dropped
    state = plain_bn_state_dict()
    layer = make("blend")
    with pytest.warns(UserWarning, match="γ.*dropped"):
        result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, name), state[name]), name
    assert torch.all(layer.prev_std == 0)
    x = make_input(26)
    expected = normalise(x, state["running_mean"], state["running_var"]) + per_channel(state["bias"])
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


def test_blend_prev_std_is_saved():
    layer = make("blend").train()
    x = make_input(27)
    layer(x)
    _, var = batch_mean_var(x)
    torch.testing.assert_close(layer.state_dict()["prev_std"], torch.sqrt(var + EPS), **TIGHT)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_state_dict_tensors_are_per_channel(kind):
    layer = make(kind)
    state = layer.state_dict()
    for name in layer.extra_tensor_names:
        assert name in state, name
    for name, tensor in state.items():
        if name != "num_batches_tracked":
            assert tensor.shape == (C,), (name, tuple(tensor.shape))


# ---- 6. models ----------------------------------------------------------------------------------------------------


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_resnet50_gamma01_on_all_bn_layers():
    model = timm.create_model("resnet50", norm_layer="bn_gamma01", zero_init_last=False)
    norms = batch_norms(model)
    assert len(norms) == 53
    assert all(type(m) is BatchNormGamma2d for m in norms)
    assert all(torch.all(m.weight == 0.1) and torch.all(m.bias == 0) for m in norms)


def expected_types(name: str) -> tuple[type, type]:
    factory = timm_bninit.get_norm_layer(name)
    plain = factory.func if isinstance(factory, functools.partial) else factory
    return plain, VARIANT_TYPES[plain]


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("name", timm_bninit.list_norm_layers())
def test_every_variant_builds_and_trains(model_name, name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, norm_layer=name, num_classes=4).train()
    plain, fused = expected_types(name)
    norms = batch_norms(model)
    assert norms and all(type(m) is (plain if model_name == "resnet18" else fused) for m in norms)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(m.num_batches_tracked.item() == 1 for m in norms)


def act_types(model: nn.Module) -> Counter:
    return Counter(type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d))


@pytest.mark.parametrize("name", ["bn_gamma01", "bn_uniform", "rbn", "iebn_unit", "bn_blend05"])
def test_efficientnet_keeps_silu(name):
    model = timm.create_model("efficientnet_b0", norm_layer=name, num_classes=4)
    assert isinstance(model.bn1.act, nn.SiLU) and isinstance(model.bn2.act, nn.SiLU)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    # the fused layers carry exactly the activations of the stock model
    assert act_types(model) == act_types(timm.create_model("efficientnet_b0", num_classes=4))
    assert act_types(model)["SiLU"] > 0


@pytest.mark.parametrize("model_name", ["resnetv2_18", "regnetx_002", "densenet121", "cs3darknet_s", "gernet_s"])
def test_norm_act_families_build_fused_variants(model_name):
    model = timm.create_model(model_name, norm_layer="rbn", num_classes=4)
    norms = batch_norms(model)
    assert norms and all(type(m) is timm_bninit.RepresentativeBatchNormAct2d for m in norms)


@pytest.mark.parametrize(("model_name", "name"), [("resnet18", "rbn"), ("efficientnet_b0", "bn_blend05"),
                                                  ("efficientnet_b0", "iebn")])
def test_features_only(model_name, name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, norm_layer=name, features_only=True).train()
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [64 // f.shape[-1] for f in features] == model.feature_info.reduction()
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["rbn", "rbn_unit", "iebn", "blend"])
def test_channels_last_matches_contiguous(kind):
    contiguous = randomize(make(kind))
    last = randomize(make(kind))
    set_running_stats(contiguous)
    set_running_stats(last)
    x = make_input(28)
    x_last = x.clone().to(memory_format=torch.channels_last)
    assert not x_last.is_contiguous()
    for step in range(2):  # two steps: the blend layer's second step uses σ_prev
        xa, xb = x.clone().requires_grad_(), x_last.clone().requires_grad_()
        ya, yb = contiguous.train()(xa), last.train()(xb)
        torch.testing.assert_close(yb, ya, **TIGHT)
        weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape) + step
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **TIGHT)
        for (name, pa), (_, pb) in zip(contiguous.named_parameters(), last.named_parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, **TIGHT, msg=name)
    torch.testing.assert_close(last.running_mean, contiguous.running_mean, **TIGHT)
    torch.testing.assert_close(last.running_var, contiguous.running_var, **TIGHT)
    torch.testing.assert_close(last.eval()(x_last), contiguous.eval()(x), **TIGHT)


def test_channels_last_model_matches_contiguous():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", norm_layer="rbn", num_classes=4, dtype=torch.float64).eval()
    for m in batch_norms(model):
        randomize(m, seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_dtype_and_device_kwargs_flow(kind):
    layer = LAYERS[kind](C, dtype=torch.float64)
    floats = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    meta = LAYERS[kind](C, device="meta")
    assert all(t.device.type == "meta" for t in (*meta.parameters(), *meta.buffers()))


@pytest.mark.parametrize(("model_name", "name"), [("resnet18", "iebn"), ("efficientnet_b0", "bn_blend025"),
                                                  ("efficientnet_b0", "rbn_unit")])
def test_model_dtype_kwarg_flows(model_name, name):
    model = timm.create_model(model_name, norm_layer=name, num_classes=4, dtype=torch.float64)
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert all(t.dtype == torch.float64 for t in floats)
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


# ---- 7. input errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CALIBRATED)
def test_rejects_non_4d_input(kind):
    layer = make(kind)
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\).*\(2, 5, 7\)"):
        layer(torch.randn(2, C, 7, dtype=torch.float64))


@pytest.mark.parametrize("kind", CALIBRATED)
def test_rejects_wrong_channel_count(kind):
    layer = make(kind)
    with pytest.raises(ValueError, match=r"built for 5 channels but the input has 3"):
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_train_mode_single_value_per_channel(kind):
    layer = make(kind).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))
    # eval mode normalises a single value with the running statistics
    assert layer.eval()(torch.randn(1, C, 1, 1, dtype=torch.float64)).shape == (1, C, 1, 1)


@pytest.mark.parametrize("kind", CALIBRATED)
def test_single_value_per_channel_without_running_stats(kind):
    layer = make(kind, track_running_stats=False).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))


def test_plain_bn_variants_reject_non_4d_input():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNormGamma2d(C)(torch.randn(2, C, 7))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_blend_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"prev_std_weight \(α\) must be in \[0, 1\)"):
        BlendedStdBatchNorm2d(C, prev_std_weight=alpha)


@pytest.mark.parametrize("gamma_lr_div", [0.0, -1.0])
def test_gamma_lr_div_must_be_positive(gamma_lr_div):
    with pytest.raises(ValueError, match="gamma_lr_div must be > 0"):
        BatchNormGamma2d(C, gamma_lr_div=gamma_lr_div)
