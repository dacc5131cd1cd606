"""Unit tests of the timm-bninit norm layers against the formulas of docs/methods.md §1-§5.

Every numerical expectation is written out below with plain tensor ops (``reference_*`` helpers); a layer is never
compared with itself or with another instance of itself (the one exception, section 4b, compares the hand-written
backward with the autograd path of the same formula, each also checked against the formula). Numerics run in
float64 with non-default values for every parameter, and ``eps``/``momentum`` away from their defaults so that where
ε sits and which momentum is used show, on NCHW-contiguous and channels_last inputs. The variants come from the
registry (``tests/variants.py``): a newly registered variant is in every test here.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections import Counter

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.func import functional_call
from variants import distinct_forms, factory, names

import timm_bninit
from timm_bninit import (
    BatchNormGamma2d,
    BatchNormUniformGamma2d,
    BlendedStdBatchNorm2d,
    BlendedStdBatchNormAct2d,
    InstanceEnhancementBatchNorm2d,
    InstanceEnhancementBatchNormAct2d,
    RepresentativeBatchNorm2d,
    RepresentativeBatchNormAct2d,
)
from timm_bninit import norm as norm_module

C = 5
EPS = 1e-3  # large enough that ε inside vs outside the square root differs far above float64 tolerance
MOMENTUM = 0.3
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
SIGMOID_1 = 1.0 / (1.0 + math.exp(-1.0))  # RBN's effective initial γ, ≈ 0.731
SIGMOID_M1 = 1.0 / (1.0 + math.exp(1.0))  # IEBN's effective initial γ, ≈ 0.269

RBN_TYPES = (RepresentativeBatchNorm2d, RepresentativeBatchNormAct2d)
IEBN_TYPES = (InstanceEnhancementBatchNorm2d, InstanceEnhancementBatchNormAct2d)
BLEND_TYPES = (BlendedStdBatchNorm2d, BlendedStdBatchNormAct2d)
ALL = names()
CALIBRATED = names("calibrated")
BLENDS = names(of=BlendedStdBatchNorm2d)
RBNS = names(of=RepresentativeBatchNorm2d)
IEBNS = names(of=InstanceEnhancementBatchNorm2d)


def make(name: str, fused: bool = False, **kwargs) -> nn.BatchNorm2d:
    """The float64 layer registered as ``name`` (its fused twin, with SiLU, if ``fused``), C channels."""
    kwargs = {"eps": EPS, "momentum": MOMENTUM, "dtype": torch.float64, **kwargs}
    if fused:
        kwargs.setdefault("act_layer", nn.SiLU)
    return factory(name, fused)(C, **kwargs)


WITH_GAMMA = [name for name in CALIBRATED if isinstance(make(name).weight, nn.Parameter)]


@pytest.fixture(params=[torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def memory_format(request) -> torch.memory_format:
    """Both layouts a run feeds the layers: NCHW-contiguous and channels_last (the recipes' default)."""
    return request.param


def make_input(seed: int, n: int = 4, h: int = 5, w: int = 6,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Float64 input whose per-(sample, channel) means and scales differ, so GAP terms matter."""
    gen = torch.Generator().manual_seed(seed)
    offset = 2.0 * torch.randn(n, C, 1, 1, generator=gen, dtype=torch.float64)
    scale = 0.5 + torch.rand(n, C, 1, 1, generator=gen, dtype=torch.float64) * 2.0
    x = offset + scale * torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    assert memory_format == torch.contiguous_format or h * w == 1 or not x.is_contiguous()
    return x


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
    """σ blended with σ_prev where a previous batch exists (σ_prev > 0 for the channel), σ_B alone elsewhere."""
    mean, var = batch_mean_var(x)
    batch_std = torch.sqrt(var + EPS)
    std = batch_std
    if prev_std is not None:
        std = torch.where(prev_std > 0, alpha * prev_std + (1.0 - alpha) * batch_std, batch_std)
    return (x - per_channel(mean)) / per_channel(std) + per_channel(beta), batch_std


def reference_forward(layer: nn.Module, x: torch.Tensor, stats=None, params=None) -> torch.Tensor:
    """The layer's formula evaluated from its parameter values (or ``params``, by name) and state *before* the call
    (``stats``: running statistics in eval), without the fused layers' activation. A variant without a formula here
    fails."""
    p = params if params is not None else {name: t.detach() for name, t in layer.named_parameters()}
    gamma = p.get("weight", torch.ones(C, dtype=torch.float64))  # affine=False: γ = 1, β = 0
    beta = p.get("bias", torch.zeros(C, dtype=torch.float64))
    if isinstance(layer, RBN_TYPES):
        return reference_rbn(x, gamma, beta, p["centering_weight"], p["scaling_weight"], p["scaling_bias"], stats,
                             identity_init=layer.identity_init)
    if isinstance(layer, IEBN_TYPES):
        return reference_iebn(x, gamma, beta, p["instance_weight"], p["instance_bias"], stats,
                              identity_init=layer.identity_init)
    if isinstance(layer, BLEND_TYPES):
        if stats is not None:  # eval: BN without γ on the running statistics
            return reference_bn(x, torch.ones(C, dtype=torch.float64), beta, stats)
        prev_std = layer.prev_std.detach().clone() if layer.training else None  # σ_prev only in training
        return reference_blend(x, beta, layer.prev_std_weight, prev_std)[0]
    if isinstance(layer, timm_bninit.BatchNormVariant) and layer.plain_bn_forward:
        return reference_bn(x, gamma, beta, stats)
    raise AssertionError(f"no reference formula for {type(layer).__name__}: write one in this file")


def eval_stats(layer: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.running_mean.clone(), layer.running_var.clone()


# ---- 1. forward against the formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma_init", [0.01, 0.1, 0.37, 1.0])
def test_gamma_init_values_and_forward_is_plain_bn(gamma_init, memory_format):
    layer = BatchNormGamma2d(C, gamma_init=gamma_init, eps=EPS, dtype=torch.float64)
    assert torch.all(layer.weight == gamma_init)
    assert torch.all(layer.bias == 0)
    assert layer.gamma_init_value == gamma_init
    assert layer.gamma_lr_div == 100.0
    x = make_input(0, memory_format=memory_format)
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


@pytest.mark.parametrize("name", ALL)
def test_forward_train_matches_formula(name, memory_format):
    layer = randomize(make(name)).train()
    x = make_input(1, memory_format=memory_format)
    expected = reference_forward(layer, x)
    torch.testing.assert_close(layer(x), expected, **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_forward_eval_matches_formula_with_running_stats(name, memory_format):
    layer = randomize(make(name))
    set_running_stats(layer)
    stats = eval_stats(layer)
    x = make_input(2, memory_format=memory_format)
    y = layer.eval()(x)
    torch.testing.assert_close(y, reference_forward(layer, x, stats), **TIGHT)
    # eval reads the running statistics, it does not update them
    torch.testing.assert_close(eval_stats(layer), stats, rtol=0, atol=0)


@pytest.mark.parametrize("name", RBNS)
def test_rbn_gap_of_normalised_uses_calibrated_input(name, memory_format):
    """Centering calibration matters: with w_m ≠ 0 the result differs from RBN evaluated on the raw x."""
    layer = randomize(make(name)).train()
    x = make_input(3, memory_format=memory_format)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    without_centering = reference_rbn(x, p["weight"], p["bias"], torch.zeros(C, dtype=torch.float64),
                                      p["scaling_weight"], p["scaling_bias"], identity_init=layer.identity_init)
    expected = reference_forward(layer, x)
    y = layer(x)
    assert (y - without_centering).abs().max() > 1e-3
    torch.testing.assert_close(y, expected, **TIGHT)


@pytest.mark.parametrize("name", IEBNS)
def test_iebn_attention_uses_raw_input_gap(name, memory_format):
    """a = σ(γ̂·GAP(x) + β̂) on the raw input, not on x̂ (whose GAP would differ)."""
    layer = randomize(make(name)).train()
    x = make_input(4, memory_format=memory_format)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    mean, var = batch_mean_var(x)
    x_hat = normalise(x, mean, var)
    a_on_normalised = torch.sigmoid(per_channel(p["instance_weight"]) * gap(x_hat) + per_channel(p["instance_bias"]))
    if layer.identity_init:
        a_on_normalised = a_on_normalised / SIGMOID_M1
    wrong = x_hat * (per_channel(p["weight"]) * a_on_normalised) + per_channel(p["bias"])
    expected = reference_forward(layer, x)
    y = layer(x)
    assert (y - wrong).abs().max() > 1e-3
    torch.testing.assert_close(y, expected, **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_blend_first_step_then_previous_batch_std(name, memory_format):
    layer = randomize(make(name)).train()
    alpha = layer.prev_std_weight
    beta = layer.bias.detach().clone()
    x1, x2, x3, x_eval = (make_input(seed, memory_format=memory_format) for seed in (5, 6, 7, 8))

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


@pytest.mark.parametrize("name", BLENDS)
def test_blend_eval_uses_running_stats_like_bn(name, memory_format):
    layer = randomize(make(name))
    set_running_stats(layer)
    rm, rv = eval_stats(layer)
    with torch.no_grad():
        layer.prev_std.fill_(3.0)  # must be ignored in eval
    x = make_input(9, memory_format=memory_format)
    expected = (x - per_channel(rm)) / torch.sqrt(per_channel(rv) + EPS) + per_channel(layer.bias.detach())
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


def test_blend_names_cover_the_alpha_grid():
    # docs/methods.md §4: α ∈ {0.1, 0.25, 0.5, 0.75, 0.9}, each registered (and tested below and above by name)
    assert sorted(make(name).prev_std_weight for name in BLENDS) == [0.1, 0.25, 0.5, 0.75, 0.9]


@pytest.mark.parametrize("name", BLENDS)
def test_blend_alpha_grid(name, memory_format):
    layer = randomize(make(name)).train()
    alpha = layer.prev_std_weight
    beta = layer.bias.detach().clone()
    x1, x2 = make_input(10, memory_format=memory_format), make_input(11, memory_format=memory_format)
    _, std1 = reference_blend(x1, beta, alpha)
    layer(x1)
    torch.testing.assert_close(layer(x2), reference_blend(x2, beta, alpha, prev_std=std1)[0], **TIGHT)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_fused_variant_is_activation_of_formula(name, training, memory_format):
    layer = randomize(make(name, fused=True))
    assert isinstance(layer, BatchNormAct2d) and isinstance(layer.act, nn.SiLU)
    set_running_stats(layer)
    stats = None if training else eval_stats(layer)
    x = make_input(29, memory_format=memory_format)
    expected = torch.nn.functional.silu(reference_forward(layer.train(training), x, stats))
    torch.testing.assert_close(layer(x), expected, **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_fused_blend_is_activation_of_formula(name, memory_format):
    layer = randomize(make(name, fused=True)).train()
    alpha = layer.prev_std_weight
    beta = layer.bias.detach().clone()
    x1, x2 = make_input(30, memory_format=memory_format), make_input(31, memory_format=memory_format)
    expected1, std1 = reference_blend(x1, beta, alpha)
    torch.testing.assert_close(layer(x1), torch.nn.functional.silu(expected1), **TIGHT)
    expected2, _ = reference_blend(x2, beta, alpha, prev_std=std1)
    torch.testing.assert_close(layer(x2), torch.nn.functional.silu(expected2), **TIGHT)


@pytest.mark.parametrize("name", WITH_GAMMA)
def test_without_affine_gamma_is_one_and_beta_zero(name, memory_format):
    layer = randomize(make(name, affine=False)).train()
    assert layer.weight is None and layer.bias is None
    x = make_input(32, memory_format=memory_format)
    p = {name: t.detach() for name, t in layer.named_parameters()}
    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    if isinstance(layer, RBN_TYPES):
        expected = reference_rbn(x, ones, zeros, p["centering_weight"], p["scaling_weight"], p["scaling_bias"],
                                 identity_init=layer.identity_init)
    else:
        expected = reference_iebn(x, ones, zeros, p["instance_weight"], p["instance_bias"],
                                  identity_init=layer.identity_init)
    torch.testing.assert_close(layer(x), expected, **TIGHT)


@pytest.mark.parametrize("name", CALIBRATED)
def test_without_running_stats_eval_uses_batch_stats(name, memory_format):
    """Like ``nn.BatchNorm2d(track_running_stats=False)``: batch statistics in both modes."""
    layer = randomize(make(name, track_running_stats=False)).eval()
    assert layer.running_mean is None
    x = make_input(33, memory_format=memory_format)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_blend_without_running_stats_eval_uses_batch_std(name, memory_format):
    layer = randomize(make(name, track_running_stats=False)).eval()
    x = make_input(34, memory_format=memory_format)
    torch.testing.assert_close(layer(x), reference_blend(x, layer.bias.detach(), layer.prev_std_weight)[0], **TIGHT)


@pytest.mark.parametrize("name", CALIBRATED)
def test_float32_accuracy(name):
    """A float32 layer stays near the float64 formula for inputs whose mean is ~1000 times their spread.

    nn.BatchNorm2d is off by ≈1e-4 here; a one-pass E[x²] − E[x]² variance in float32 would be off by ~10%.
    """
    layer = make(name, dtype=torch.float32).train()
    x = 100.0 + 0.05 * make_input(35, n=4, h=8, w=8)
    y = layer(x.float()).double()
    mean, var = batch_mean_var(x)
    expected = normalise(x, mean, var) * getattr(layer, "initial_scale", 1.0)
    torch.testing.assert_close(y, expected, rtol=0, atol=5e-4)


def test_reset_affine_parameters_restores_init_but_not_running_stats():
    # the initial values docs/methods.md §1-§3 specify
    for name, inits in [("bn_gamma025", {"weight": 0.25, "bias": 0.0}),
                        ("rbn", {"weight": 1.0, "bias": 0.0, "centering_weight": 0.0, "scaling_weight": 0.0,
                                 "scaling_bias": 1.0}),
                        ("iebn", {"weight": 1.0, "bias": 0.0, "instance_weight": 0.0, "instance_bias": -1.0})]:
        layer = randomize(make(name))
        set_running_stats(layer)
        stats = eval_stats(layer)
        layer.reset_affine_parameters()
        for tensor_name, value in inits.items():
            assert torch.all(getattr(layer, tensor_name) == value), (name, tensor_name)
        torch.testing.assert_close(eval_stats(layer), stats, rtol=0, atol=0)


# ---- 2. running statistics ----------------------------------------------------------------------------------------


def statistics_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor whose batch statistics the layer tracks: RBN tracks the centring-calibrated x."""
    if isinstance(layer, RBN_TYPES):
        return x + per_channel(layer.centering_weight.detach()) * gap(x)
    return x


@pytest.mark.parametrize("name", ALL)
def test_running_stats_follow_bn_update(name, memory_format):
    layer = randomize(make(name)).train()
    set_running_stats(layer)
    x = make_input(12, memory_format=memory_format)
    rm, rv = eval_stats(layer)
    mean, var = batch_mean_var(statistics_input(layer, x))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    layer(x)
    torch.testing.assert_close(layer.running_mean, (1 - MOMENTUM) * rm + MOMENTUM * mean, **TIGHT)
    torch.testing.assert_close(layer.running_var, (1 - MOMENTUM) * rv + MOMENTUM * var * count / (count - 1), **TIGHT)
    assert layer.num_batches_tracked.item() == 1
    layer(make_input(13, memory_format=memory_format))
    assert layer.num_batches_tracked.item() == 2


@pytest.mark.parametrize("name", ALL)
def test_running_stats_cumulative_average_when_momentum_none(name, memory_format):
    layer = randomize(make(name, momentum=None)).train()
    x1, x2 = make_input(14, memory_format=memory_format), make_input(15, n=3, h=4, w=7, memory_format=memory_format)
    stats1 = batch_mean_var(statistics_input(layer, x1))
    stats2 = batch_mean_var(statistics_input(layer, x2))
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


@pytest.mark.parametrize(("name", "scale"), [("rbn", SIGMOID_1), ("iebn", SIGMOID_M1), ("rbn_unit", 1.0),
                                             ("iebn_unit", 1.0)])
def test_initial_effective_scale(name, scale, memory_format):
    layer = make(name).train()
    assert math.isclose(layer.initial_scale, scale, rel_tol=1e-12)
    x = make_input(16, memory_format=memory_format)
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


@pytest.mark.parametrize("name", RBNS + IEBNS)
def test_gradcheck_calibrated(name, memory_format):
    layer = randomize(make(name)).train()
    assert len(list(layer.parameters())) == (5 if isinstance(layer, RBN_TYPES) else 4)
    gradcheck_layer(layer, make_input(17, n=2, h=3, w=3, memory_format=memory_format))


@pytest.mark.parametrize("name", BLENDS)
def test_gradcheck_blend_first_step(name, memory_format):
    layer = randomize(make(name)).train()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    gradcheck_layer(layer, make_input(18, n=2, h=3, w=3, memory_format=memory_format),
                    before_call=layer.prev_std.zero_)
    # the first step is σ_B alone: the analytical gradient wrt x is BN's (γ = 1)
    x = make_input(18, n=2, h=3, w=3, memory_format=memory_format).requires_grad_()
    weights = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape)
    layer.prev_std.zero_()
    (layer(x) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (normalise(x_ref, *batch_mean_var(x_ref)) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_gradcheck_blend_second_step_prev_std_is_constant(name, memory_format):
    layer = randomize(make(name)).train()
    x1 = make_input(19, n=2, h=3, w=3, memory_format=memory_format).requires_grad_()
    layer(x1)
    prev = layer.prev_std.detach().clone()
    assert not layer.prev_std.requires_grad and layer.prev_std.grad_fn is None
    assert torch.all(prev > 0)
    gradcheck_layer(layer, make_input(20, n=2, h=3, w=3, memory_format=memory_format),
                    before_call=lambda: layer.prev_std.copy_(prev))

    # the second step's gradient wrt x2 is that of the formula with σ_prev a constant, and nothing flows to x1
    x2 = make_input(20, n=2, h=3, w=3, memory_format=memory_format).requires_grad_()
    layer.prev_std.copy_(prev)
    weights = torch.linspace(-1, 1, x2.numel(), dtype=x2.dtype).reshape(x2.shape)
    (layer(x2) * weights).sum().backward()
    assert x1.grad is None
    x_ref = x2.detach().clone().requires_grad_()
    (reference_blend(x_ref, layer.bias.detach(), layer.prev_std_weight, prev_std=prev)[0] * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x_ref.grad, **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_parameter_and_input_gradients_match_formula(name, memory_format):
    """Autograd through the layer equals autograd through the written-out formula, for every parameter and x."""
    layer = randomize(make(name)).train()
    x = make_input(21, memory_format=memory_format)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_forward(layer, x_ref, params=ref)
    x = x.requires_grad_()
    (layer(x) * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-11)
    for param_name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref[param_name].grad, rtol=1e-9, atol=1e-11, msg=param_name)


# ---- 4b. the hand-written backward against the autograd path --------------------------------------------------------


def train_two_steps(layer: nn.Module, memory_format: torch.memory_format) -> dict[str, object]:
    """Two training steps (blended-σ's second uses σ_prev) and an eval forward: what a comparison needs."""
    seen: dict[str, object] = {}
    for step in range(2):
        x = make_input(40 + step, memory_format=memory_format).requires_grad_()
        weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        y = layer(x)
        (y * weights).sum().backward()
        seen[f"step {step} y"], seen[f"step {step} ∂L/∂x"] = y.detach(), x.grad
        for name, p in layer.named_parameters():
            seen[f"step {step} ∂L/∂{name}"] = p.grad.clone()
        layer.zero_grad()
    seen.update({name: b.clone() for name, b in layer.named_buffers()})
    with torch.no_grad():
        seen["eval y"] = layer.eval()(make_input(42, memory_format=memory_format))
    return seen


@pytest.mark.parametrize("options", [{}, {"affine": False}, {"momentum": None}], ids=["", "noaffine", "cma"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", CALIBRATED)
def test_fused_function_equals_autograd_path(name, fused, options, memory_format, monkeypatch):
    """The closed-form backward (PlaneAffineFunction, or NativeStepFunction's C step) is an optimisation: it computes
    what autograd computes through the layer's forward coefficients, outputs, input and parameter gradients, and
    running statistics alike."""
    function_calls = []
    for function in ("PlaneAffineFunction", "NativeStepFunction"):
        real = getattr(norm_module, function)
        monkeypatch.setattr(norm_module, function, types.SimpleNamespace(
            apply=lambda *args, real=real: function_calls.append(1) or real.apply(*args)))
    hand_written = randomize(make(name, fused=fused, **options))
    through_autograd = randomize(make(name, fused=fused, **options))
    through_autograd.force_autograd = True
    assert hand_written.uses_fused_backward() and not through_autograd.uses_fused_backward()

    want = train_two_steps(through_autograd.train(), memory_format)
    assert not function_calls  # the autograd path never entered the Function ...
    got = train_two_steps(hand_written.train(), memory_format)
    assert len(function_calls) == 2  # ... and the hand-written one took it at every training step
    assert list(got) == list(want)
    for what, value in want.items():
        torch.testing.assert_close(got[what], value, **TIGHT, msg=what)


# ---- 5. state dicts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    layer = randomize(make(name), seed=3).train()
    for seed in (22, 23):
        layer(make_input(seed))
    fresh = make(name)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    for tensor_name, tensor in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[tensor_name], tensor), tensor_name
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


@pytest.mark.parametrize(("name", "extra_inits"), [
    ("rbn", {"centering_weight": 0.0, "scaling_weight": 0.0, "scaling_bias": 1.0}),
    ("iebn", {"instance_weight": 0.0, "instance_bias": -1.0}),
    ("bn_gamma025", {}),
])
def test_standard_bn_state_dict_loads_strict(name, extra_inits):
    state = plain_bn_state_dict()
    layer = make(name)
    result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for tensor_name, tensor in state.items():
        assert torch.equal(getattr(layer, tensor_name), tensor), tensor_name
    for tensor_name, value in extra_inits.items():
        assert torch.all(getattr(layer, tensor_name) == value), tensor_name
    # the loaded layer is the BN it came from, times its initial effective scale (1 for the γ-init variant)
    x = make_input(25)
    stats = (state["running_mean"], state["running_var"])
    scale = getattr(layer, "initial_scale", 1.0)
    expected = scale * per_channel(state["weight"]) * normalise(x, *stats) + per_channel(state["bias"])
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_blend_has_no_gamma_parameter(name):
    layer = make(name)
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" in dict(layer.named_buffers())
    assert "weight" not in layer.state_dict()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert "prev_std" in layer.state_dict()


@pytest.mark.parametrize("name", BLENDS)
def test_blend_loads_standard_bn_state_dict(name):
    # γ == 1: nothing is lost, no warning
    layer = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(plain_bn_state_dict(gamma_value=1.0), strict=True)
    # γ != 1: loads strictly, but says that γ was dropped
    state = plain_bn_state_dict()
    layer = make(name)
    with pytest.warns(UserWarning, match="γ.*dropped"):
        result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for tensor_name in ("bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, tensor_name), state[tensor_name]), tensor_name
    assert torch.all(layer.prev_std == 0)
    x = make_input(26)
    expected = normalise(x, state["running_mean"], state["running_var"]) + per_channel(state["bias"])
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


@pytest.mark.parametrize("name", BLENDS)
def test_blend_prev_std_is_saved(name):
    layer = make(name).train()
    x = make_input(27)
    layer(x)
    _, var = batch_mean_var(x)
    torch.testing.assert_close(layer.state_dict()["prev_std"], torch.sqrt(var + EPS), **TIGHT)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_tensors_are_per_channel(name):
    layer = make(name)
    state = layer.state_dict()
    for tensor_name in layer.extra_tensor_names:
        assert tensor_name in state, tensor_name
    for tensor_name, tensor in state.items():
        if tensor_name != "num_batches_tracked":
            assert tensor.shape == (C,), (tensor_name, tuple(tensor.shape))


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
    plain = factory(name)
    fused = factory(name, fused=True)
    return tuple(f.func if isinstance(f, functools.partial) else f for f in (plain, fused))


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("name", ALL)
def test_every_variant_builds_and_trains(model_name, name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, norm_layer=name, num_classes=4).train()
    plain, fused = expected_types(name)
    assert issubclass(fused, plain.__mro__[1]) and issubclass(fused, BatchNormAct2d)  # the same variant, fused
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


@functools.cache
def stock_act_types(model_name: str) -> Counter:
    return act_types(timm.create_model(model_name, num_classes=4))


@pytest.mark.parametrize("name", ALL)
def test_efficientnet_keeps_silu(name):
    model = timm.create_model("efficientnet_b0", norm_layer=name, num_classes=4)
    assert isinstance(model.bn1.act, nn.SiLU) and isinstance(model.bn2.act, nn.SiLU)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    # the fused layers carry exactly the activations of the stock model
    assert act_types(model) == stock_act_types("efficientnet_b0")
    assert act_types(model)["SiLU"] > 0


@pytest.mark.parametrize("model_name", ["resnetv2_18", "regnetx_002", "densenet121", "cs3darknet_s", "gernet_s"])
def test_norm_act_families_build_fused_variants(model_name):
    model = timm.create_model(model_name, norm_layer="rbn", num_classes=4)
    norms = batch_norms(model)
    assert norms and all(type(m) is timm_bninit.RepresentativeBatchNormAct2d for m in norms)


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("name", distinct_forms())
def test_features_only(model_name, name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, norm_layer=name, features_only=True).train()
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [64 // f.shape[-1] for f in features] == model.feature_info.reduction()
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CALIBRATED)
def test_channels_last_matches_contiguous(name):
    contiguous = randomize(make(name))
    last = randomize(make(name))
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
        for (param_name, pa), (_, pb) in zip(contiguous.named_parameters(), last.named_parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, **TIGHT, msg=param_name)
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


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", ALL)
def test_dtype_and_device_kwargs_flow(name, fused):
    layer = factory(name, fused)(C, dtype=torch.float64)
    floats = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    meta = factory(name, fused)(C, device="meta")
    assert all(t.device.type == "meta" for t in (*meta.parameters(), *meta.buffers()))


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("name", distinct_forms())
def test_model_dtype_kwarg_flows(model_name, name):
    model = timm.create_model(model_name, norm_layer=name, num_classes=4, dtype=torch.float64)
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert all(t.dtype == torch.float64 for t in floats)
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


# ---- 7. input errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CALIBRATED)
def test_rejects_non_4d_input(name):
    layer = make(name)
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\).*\(2, 5, 7\)"):
        layer(torch.randn(2, C, 7, dtype=torch.float64))


@pytest.mark.parametrize("name", CALIBRATED)
def test_rejects_wrong_channel_count(name):
    layer = make(name)
    with pytest.raises(ValueError, match=r"built for 5 channels but the input has 3"):
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL)
def test_train_mode_single_value_per_channel(name):
    layer = make(name).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))
    # eval mode normalises a single value with the running statistics
    assert layer.eval()(torch.randn(1, C, 1, 1, dtype=torch.float64)).shape == (1, C, 1, 1)


@pytest.mark.parametrize("name", CALIBRATED)
def test_single_value_per_channel_without_running_stats(name):
    layer = make(name, track_running_stats=False).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("name", names("plain"))
def test_plain_bn_variants_reject_non_4d_input(name):
    with pytest.raises(ValueError, match="expected 4D input"):
        factory(name)(C)(torch.randn(2, C, 7))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_blend_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"prev_std_weight \(α\) must be in \[0, 1\)"):
        BlendedStdBatchNorm2d(C, prev_std_weight=alpha)


@pytest.mark.parametrize("gamma_lr_div", [0.0, -1.0])
def test_gamma_lr_div_must_be_positive(gamma_lr_div):
    with pytest.raises(ValueError, match="gamma_lr_div must be > 0"):
        BatchNormGamma2d(C, gamma_lr_div=gamma_lr_div)
