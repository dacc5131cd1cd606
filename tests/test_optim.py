"""Optimizer groups: what goes where, and γ keeping exactly 1/c of the scheduled learning rate."""

import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from variants import factory, names

import timm_bninit as tb


def by_name(groups):
    return {g["name"]: g for g in groups}


def ids(params):
    return {id(p) for p in params}


def test_groups_split_decay_no_decay_and_gamma():
    model = timm.create_model("resnet18", norm_layer="bn_gamma01", num_classes=3)
    groups = by_name(tb.param_groups(model, weight_decay=1e-4))
    convs_and_linear = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert ids(groups["decay"]["params"]) == ids(convs_and_linear)
    assert groups["decay"]["weight_decay"] == 1e-4
    assert ids(groups["no_decay"]["params"]) == ids([bn.bias for bn in bns] + [model.fc.bias])
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert ids(groups["bn_gamma"]["params"]) == ids([bn.weight for bn in bns])
    assert groups["bn_gamma"]["weight_decay"] == 0.0 and groups["bn_gamma"]["lr_scale"] == 0.01
    assert "lr" not in groups["bn_gamma"]  # never both lr and lr_scale
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_calibration_parameters_have_no_decay_and_gamma_has_base_rate_in_rbn():
    model = timm.create_model("resnet18", norm_layer="rbn", num_classes=3)
    groups = by_name(tb.param_groups(model, weight_decay=1e-4))
    calibration = [p for m in model.modules() if isinstance(m, tb.RepresentativeBatchNorm2d)
                   for p in (m.centering_weight, m.scaling_weight, m.scaling_bias)]
    assert ids(calibration) <= ids(groups["no_decay"]["params"])
    assert groups["bn_gamma"]["lr_scale"] == 1.0


@pytest.mark.parametrize("name", names())
def test_every_registered_variant_groups_its_gamma_and_its_own_parameters(name):
    """param_groups knows no variant by name: any BN subclass's γ goes to the γ group at 1/gamma_lr_div, its β and
    extra per-channel parameters to no_decay."""
    plain, fused = factory(name)(4), factory(name, fused=True)(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), plain, nn.Conv2d(4, 4, 1), fused)
    groups = by_name(tb.param_groups(model, weight_decay=1e-4))
    norms = (plain, fused)
    gammas = [m.weight for m in norms if isinstance(m.weight, nn.Parameter)]  # the blended-σ layer has no γ
    extras = [getattr(m, extra) for m in norms for extra in m.extra_tensor_names
              if isinstance(getattr(m, extra), nn.Parameter)]
    assert ids(groups["decay"]["params"]) == ids([model[0].weight, model[2].weight])
    assert ids(groups["no_decay"]["params"]) == ids([model[0].bias, model[2].bias, *(m.bias for m in norms), *extras])
    if gammas:
        assert ids(groups["bn_gamma"]["params"]) == ids(gammas)
        assert groups["bn_gamma"]["lr_scale"] == 1.0 / plain.gamma_lr_div and groups["bn_gamma"]["weight_decay"] == 0
    else:
        assert "bn_gamma" not in groups
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_plain_bn_gamma_can_be_divided_and_frozen_params_are_left_out():
    model = timm.create_model("resnet18", num_classes=3)
    model.conv1.weight.requires_grad_(False)
    groups = by_name(tb.param_groups(model, gamma_lr_div=100, lr=0.1))
    assert groups["bn_gamma"]["lr"] == pytest.approx(0.001) and "lr_scale" not in groups["bn_gamma"]
    assert groups["decay"]["lr"] == 0.1 and "weight_decay" not in groups["decay"]  # optimizer default applies
    assert id(model.conv1.weight) not in ids(p for g in groups.values() for p in g["params"])
    with pytest.raises(ValueError, match="gamma_lr_div must be > 0"):
        tb.param_groups(model, gamma_lr_div=0)


def test_distinct_divisors_get_their_own_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), tb.BatchNormGamma2d(4, gamma_lr_div=100),
                          tb.BatchNormGamma2d(4, gamma_lr_div=10), nn.BatchNorm2d(4))
    groups = by_name(tb.param_groups(model))
    assert groups["bn_gamma_div1"]["lr_scale"] == 1.0
    assert groups["bn_gamma_div10"]["lr_scale"] == pytest.approx(0.1)
    assert groups["bn_gamma_div100"]["lr_scale"] == pytest.approx(0.01)
    assert ids(groups["bn_gamma_div10"]["params"]) == {id(model[2].weight)}


def ratios(optimizer):
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    return lrs["bn_gamma"] / lrs["decay"], lrs["no_decay"] / lrs["decay"]


@pytest.mark.parametrize("sched", ["cosine", "step", "poly", "tanh"])
def test_timm_scheduler_keeps_gamma_at_one_hundredth(sched):
    model = timm.create_model("resnet18", norm_layer="bn_gamma01", num_classes=3)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9,
                                    param_group_fn=tb.param_group_fn(weight_decay=1e-4))
    scheduler, _ = create_scheduler_v2(optimizer, sched, num_epochs=4, warmup_epochs=1, warmup_lr=1e-4,
                                       min_lr=1e-5, decay_epochs=1, step_on_epochs=False, updates_per_epoch=5)
    seen = set()
    for step in range(4 * 5 + 2):
        scheduler.step_update(step)
        gamma_ratio, no_decay_ratio = ratios(optimizer)
        assert math.isclose(gamma_ratio, 0.01, rel_tol=1e-12), (step, gamma_ratio)
        assert math.isclose(no_decay_ratio, 1.0, rel_tol=1e-12)
        seen.add(round(optimizer.param_groups[0]["lr"], 10))
    assert len(seen) > 5  # the schedule really moved (warmup, decay, floor)


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)], milestones=[3]),
])
def test_torch_scheduler_keeps_gamma_at_one_hundredth(make):
    model = timm.create_model("resnet18", norm_layer="bn_gamma01", num_classes=3)
    optimizer = torch.optim.SGD(tb.param_groups(model, weight_decay=1e-4, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = make(optimizer)
    assert math.isclose(ratios(optimizer)[0], 0.01, rel_tol=1e-12)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        assert math.isclose(ratios(optimizer)[0], 0.01, rel_tol=1e-9), optimizer.param_groups[2]["lr"]


def test_gamma_update_is_one_hundredth_of_a_conv_update_with_plain_sgd():
    torch.manual_seed(0)
    bn = tb.BatchNormGamma2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), bn)
    optimizer = torch.optim.SGD(tb.param_groups(model, lr=0.5), lr=0.5)
    x = torch.randn(4, 2, 5, 5)
    model(x).pow(2).sum().backward()
    grad = bn.weight.grad.clone()
    before = bn.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(before - bn.weight.detach(), 0.005 * grad)


def test_torch_optimizers_get_their_fused_kernel_and_it_takes_the_momentum_sgd_step():
    from dataclasses import replace

    from timm_bninit.experiment.recipe import load_recipe
    from timm_bninit.experiment.train import build_optimizer

    config = load_recipe("demo")
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), tb.BatchNormGamma2d(3))
    fused = {name: build_optimizer(replace(config, optimizer=name), model).defaults.get("fused")
             for name in ("sgd", "momentum", "adamw", "lamb")}
    assert fused == {"sgd": True, "momentum": True, "adamw": True, "lamb": None}  # timm's own Lamb has no kernel
    unfused = build_optimizer(replace(config, fused_optimizer=False), model)
    assert unfused.defaults.get("fused") is None  # as studies ran

    torch.manual_seed(0)
    lr, wd, mu = 0.1, 1e-2, 0.9
    optimizer = build_optimizer(replace(config, optimizer="momentum", lr=lr, weight_decay=wd, momentum=mu,
                                        gamma_lr_div=None), model)
    conv = model[0].weight
    x = torch.randn(4, 2, 5, 5)
    p0 = conv.detach().clone()
    model(x).pow(2).sum().backward()
    g0 = conv.grad.clone()
    optimizer.step()
    # first step: the momentum buffer is the decayed gradient itself
    torch.testing.assert_close(conv.detach(), p0 - lr * (g0 + wd * p0), rtol=1e-6, atol=1e-7)
    optimizer.zero_grad()
    p1 = conv.detach().clone()
    model(x).pow(2).sum().backward()
    g1 = conv.grad.clone()
    optimizer.step()
    buffer = mu * (g0 + wd * p0) + (g1 + wd * p1)  # plain (not Nesterov) momentum, no dampening
    torch.testing.assert_close(conv.detach(), p1 - lr * buffer, rtol=1e-6, atol=1e-7)
