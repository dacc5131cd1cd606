"""A variant defined outside the package is one registration: fused twin, training, sync, optimizer groups.

``ScaledBatchNorm2d`` below is what a user writes: a calibrating layer with one extra per-channel parameter and no
hand-written backward. One ``register_norm_layer`` call (in the ``scaled_bn`` fixture, which restores the registries
afterwards) makes it a norm layer of every timm family; its gradients are checked with float64 ``gradcheck`` and
against the formula written out here. Its 2-process synchronised run is one of tests/test_sync.py's cases.
"""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.func import functional_call

import timm_bninit as tb
from timm_bninit.norm import norm_act_type

C = 4
EPS = 1e-3
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


class ScaledBatchNorm2d(tb.CalibratedBatchNorm2d):
    """"Scaled BN": ``y = x̂·γ·(1 + κ·GAP(x)) + β``, BN whose per-sample scale follows the sample's own mean.

    κ (``scale_weight``, init 0: the layer starts as BN) is the one extra per-channel parameter. Only the forward
    coefficients are written (``y = x·A + B'`` with A = γ·(1 + κ·m)/√(σ² + ε), B' = β − A·μ); training goes through
    autograd.
    """

    extra_tensor_names = ("scale_weight",)

    def __init__(self, num_features: int, *args, device=None, dtype=None, **kwargs):
        super().__init__(num_features, *args, device=device, dtype=dtype, **kwargs)
        self.scale_weight = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def _reset_extra_tensors(self) -> None:
        if "scale_weight" in self._parameters:  # nn.BatchNorm2d.__init__ resets before the parameter exists
            with torch.no_grad():
                self.scale_weight.zero_()

    def _calibration_params(self):
        return self.weight, self.bias, self.scale_weight

    def _scale(self, mean_nc, var, weight, scale_weight):
        return (1.0 + scale_weight.to(mean_nc.dtype) * mean_nc) * weight.to(mean_nc.dtype) * torch.rsqrt(var + self.eps)

    def _batch_coefficients(self, mean_nc, var_nc, plane_size, weight, bias, scale_weight):
        moments = self._batch_mean_var(mean_nc, var_nc, plane_size)  # μ, σ² (synchronised when converted)
        scale = self._scale(mean_nc, moments.var, weight, scale_weight)
        return scale, bias.to(scale.dtype) - scale * moments.mean, moments, ()

    def _normalize_with_running_stats(self, x):
        mean_nc = x.mean(dim=(2, 3), dtype=self._stats_dtype(x))
        scale = self._scale(mean_nc, self.running_var.to(mean_nc.dtype), self.weight, self.scale_weight)
        shift = self.bias.to(scale.dtype) - scale * self.running_mean.to(scale.dtype)
        return (x * scale[..., None, None] + shift[..., None, None]).to(x.dtype)


@pytest.fixture
def scaled_bn(restore_registries) -> str:
    tb.register_norm_layer("scaled_bn", ScaledBatchNorm2d)  # all a new variant needs
    return "scaled_bn"


def reference(x, gamma, beta, kappa, stats=None):
    """The formula, written out: x̂ from the batch (or running) statistics, per-sample scale 1 + κ·GAP(x)."""
    if stats is None:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = stats
    def channel(t):
        return t[None, :, None, None]

    x_hat = (x - channel(mean)) / torch.sqrt(channel(var) + EPS)
    return x_hat * channel(gamma) * (1.0 + channel(kappa) * x.mean(dim=(2, 3), keepdim=True)) + channel(beta)


def make_layer(**kwargs) -> ScaledBatchNorm2d:
    layer = ScaledBatchNorm2d(C, eps=EPS, momentum=0.3, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_(1.0 + 0.3 * noise if name == "weight" else 0.5 * noise)
    return layer


def make_input(seed: int, memory_format=torch.contiguous_format, n: int = 3, h: int = 3, w: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(n, C, 1, 1, generator=gen, dtype=torch.float64)
    scales = 0.5 + 2.0 * torch.rand(n, C, 1, 1, generator=gen, dtype=torch.float64)
    x = means + scales * torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)
    return x.contiguous(memory_format=memory_format)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def act_types(model: nn.Module) -> Counter:
    return Counter(type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d))


# ---- one registration -------------------------------------------------------------------------------------------


def test_builds_in_a_resnet_and_its_derived_twin_in_an_efficientnet(scaled_bn):
    resnet = timm.create_model("resnet18", norm_layer=scaled_bn, num_classes=3)
    norms = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(type(m) is ScaledBatchNorm2d for m in norms)

    fused = norm_act_type(ScaledBatchNorm2d)
    assert fused.__name__ == "ScaledBatchNormAct2d" and issubclass(fused, ScaledBatchNorm2d)
    assert issubclass(fused, BatchNormAct2d) and norm_act_type(ScaledBatchNorm2d) is fused  # one class, derived once
    assert tb.get_norm_act_layer(scaled_bn) is fused
    effnet = timm.create_model("efficientnet_b0", norm_layer=scaled_bn, num_classes=3)
    norms = [m for m in effnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is fused for m in norms)
    assert act_types(effnet) == act_types(timm.create_model("efficientnet_b0", num_classes=3))  # SiLU kept
    assert isinstance(effnet.bn1.act, nn.SiLU)


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
def test_trains_a_step_through_autograd(scaled_bn, model_name):
    torch.manual_seed(0)
    model = tb.create_model(model_name, scaled_bn, num_classes=3).train()
    norms = [m for m in model.modules() if isinstance(m, ScaledBatchNorm2d)]
    assert norms and not any(m.uses_fused_backward() for m in norms)
    optimizer = torch.optim.SGD(tb.param_groups(model, lr=0.1), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(m.scale_weight.grad.abs().max() > 0 for m in norms)  # κ learns from the first step
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert {f"{name}.scale_weight" for name, m in model.named_modules() if isinstance(m, ScaledBatchNorm2d)} <= changed
    assert all(m.num_batches_tracked.item() == 1 and m.running_var.ne(1).any() for m in norms)


def test_a_subclass_of_a_builtin_gets_its_own_twin(restore_registries):
    class UnitRBN(tb.RepresentativeBatchNorm2d):  # zero-argument super(): the twin must inherit, not copy
        def __init__(self, num_features, *args, **kwargs):
            super().__init__(num_features, *args, identity_init=True, **kwargs)

    tb.register_norm_layer("unit_rbn", UnitRBN)
    model = timm.create_model("efficientnet_b0", norm_layer="unit_rbn", num_classes=3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is norm_act_type(UnitRBN) and m.identity_init for m in norms)
    assert isinstance(model.bn1.act, nn.SiLU)
    # the built-in backward still belongs to the forward it inherits: the fused Function stays in use
    assert all(m.uses_fused_backward() for m in norms)


def test_a_subclass_that_changes_the_forward_trains_through_autograd():
    class DoubledRBN(tb.RepresentativeBatchNorm2d):
        def _coefficients(self, *args):
            scale, shift, saved = super()._coefficients(*args)
            return 2.0 * scale, 2.0 * shift, saved

    plain, doubled = tb.RepresentativeBatchNorm2d(C), DoubledRBN(C)
    assert plain.uses_fused_backward() and not doubled.uses_fused_backward()
    assert not norm_act_type(DoubledRBN)(C).uses_fused_backward()
    x = make_input(1).float().requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    doubled(x).square().sum().backward()
    plain(x_plain).square().sum().backward()
    # y doubles, so ∂(y²)/∂x quadruples: the autograd path differentiates the new forward, not the inherited backward
    torch.testing.assert_close(x.grad, 4.0 * x_plain.grad, rtol=1e-5, atol=1e-5)


# ---- gradients against its own formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_forward_and_gradients_match_its_formula(memory_format):
    layer = make_layer().train()
    x = make_input(2, memory_format).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    expected = reference(x_ref, params["weight"], params["bias"], params["scale_weight"])
    y = layer(x)
    torch.testing.assert_close(y, expected, **TIGHT)
    (y * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TIGHT)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, **TIGHT, msg=name)
    # running statistics: BN's update (momentum 0.3 from mean 0, variance 1) with the unbiased batch variance
    torch.testing.assert_close(layer.running_mean, 0.3 * x.detach().mean(dim=(0, 2, 3)), **TIGHT)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * x.detach().var(dim=(0, 2, 3), unbiased=True), **TIGHT)
    # eval: the same formula on the running statistics
    stats = (layer.running_mean.clone(), layer.running_var.clone())
    x_eval = make_input(4, memory_format)
    gamma, beta, kappa = (params[name].detach() for name in ("weight", "bias", "scale_weight"))
    torch.testing.assert_close(layer.eval()(x_eval), reference(x_eval, gamma, beta, kappa, stats), **TIGHT)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training):
    layer = make_layer().train(training)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = make_input(5, n=2, h=2, w=3).requires_grad_()

    def forward(inp, *values):
        return functional_call(layer, dict(zip(names, values)), (inp,))

    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- sync and optimizer groups -----------------------------------------------------------------------------------


def test_converts_with_convert_sync_batchnorm(scaled_bn):
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm,
                    tb.convert_sync_batchnorm):
        for model_name in ("resnet18", "efficientnet_b0"):
            model = tb.create_model(model_name, scaled_bn, num_classes=3)
            types, keys = {name: type(m) for name, m in model.named_modules()}, list(model.state_dict())
            synced = convert(model)
            norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert norms and all(isinstance(m, ScaledBatchNorm2d) and m.sync_batch_stats for m in norms)
            assert {name: type(m) for name, m in synced.named_modules()} == types
            assert list(synced.state_dict()) == keys


def test_param_groups_put_gamma_in_the_gamma_group_and_kappa_in_no_decay(scaled_bn):
    model = tb.create_model("resnet18", scaled_bn, num_classes=3)
    groups = {g["name"]: g for g in tb.param_groups(model, weight_decay=1e-4)}
    norms = [m for m in model.modules() if isinstance(m, ScaledBatchNorm2d)]
    assert ids(groups["bn_gamma"]["params"]) == ids(m.weight for m in norms)
    assert groups["bn_gamma"]["lr_scale"] == 1.0 and groups["bn_gamma"]["weight_decay"] == 0.0
    assert ids(m.scale_weight for m in norms) | ids(m.bias for m in norms) <= ids(groups["no_decay"]["params"])
    assert ids(m.scale_weight for m in norms).isdisjoint(ids(groups["decay"]["params"]))
