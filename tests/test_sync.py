"""SyncBatchNorm: conversion keeps every variant, and synchronised variants on 2 processes equal the 1-process layer
on the full batch.

The distributed half spawns one 2-process gloo job (CPU, float64) for the whole module; each rank runs every case on
its shard of the same batches and saves what it saw. The reference is the unconverted layer run here, in one process,
on the full batch (the allowed reference for distributed code): outputs, input gradients, parameter gradients summed
over ranks (each rank's loss is its shard's part of the full batch's sum), running statistics, blended-σ's σ_prev
after two steps, and a DDP-wrapped model after two SGD steps. The cases are every registered variant, plain and
fused, the calibrating ones also through the autograd path, a few option variations, plain BN, and the variant
tests/test_user_variant.py defines outside the package.
"""

from __future__ import annotations

import functools
import os
import warnings
import zlib
from collections.abc import Callable

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_user_variant import ScaledBatchNorm2d
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from variants import distinct_forms, factory, names

import timm_bninit as tb
from timm_bninit.norm import BatchNormVariant

C = 3
STEPS = 2  # two training steps, so that blended-σ's σ_prev (the previous global batch's σ) enters step 2
WORLD = 2
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _through_autograd(layer_factory: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    layer = layer_factory(*args, **kwargs)
    layer.force_autograd = True
    return layer


def _cases() -> dict[str, Callable[..., nn.Module]]:
    """Every registered variant (plain and fused), the calibrating ones through autograd too, option variations of
    one name per code path, plain BN (torch's and timm's), and a user's variant."""
    cases: dict[str, Callable[..., nn.Module]] = {}
    for name in names():
        cases[name], cases[f"{name}_act"] = factory(name), factory(name, fused=True)
    for name in names("calibrated"):
        cases[f"{name}_autograd"] = functools.partial(_through_autograd, factory(name))
        cases[f"{name}_act_autograd"] = functools.partial(_through_autograd, factory(name, fused=True))
    for name in distinct_forms("calibrated"):
        cases[f"{name}_noaffine"] = functools.partial(factory(name), affine=False)
    for name in distinct_forms():
        cases[f"{name}_cma"] = functools.partial(factory(name), momentum=None)  # cumulative running average
        cases[f"{name}_uneven"] = factory(name)
    # channels_last batches: the per-sample kernels, and blended σ's whole-batch ones (whose fused BN backward a
    # synchronised layer gives up for the closed form, to all-reduce between Σdy and dx)
    for name in distinct_forms("calibrated"):
        cases[f"{name}_nhwc"] = factory(name)
    # plain BN becomes (Gloo)SyncBatchNorm: torch's kernels refuse CPU tensors
    cases.update({"bn": nn.BatchNorm2d, "bn_act": functools.partial(timm.layers.BatchNormAct2d, act_layer=nn.ReLU),
                  "bn_cma": functools.partial(nn.BatchNorm2d, momentum=None), "bn_uneven": nn.BatchNorm2d,
                  "user_scaled": ScaledBatchNorm2d, "user_scaled_act": tb.norm.norm_act_type(ScaledBatchNorm2d)})
    return cases


LAYERS = _cases()
# (first rank's samples, second rank's): equal halves, and one uneven split, where ranks weigh by their counts
SPLITS = {kind: (2, 5) if kind.endswith("_uneven") else (3, 3) for kind in [*LAYERS, "model"]}


# ---- what both sides run ----------------------------------------------------------------------------------------


def make_layer(kind: str) -> nn.Module:
    layer = LAYERS[kind](C, eps=1e-3, dtype=torch.float64).train()
    if layer.momentum is not None:
        layer.momentum = 0.3
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter away from its init, so every term of the closed-form backward matters
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_(1.0 + 0.3 * noise if name == "weight" else 0.8 * noise)
    return layer


def batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of a step and the loss weights dL/dy: per-sample means and scales differ (GAP terms matter)."""
    gen = torch.Generator().manual_seed(100 * step + zlib.crc32(kind.encode()))
    n = sum(SPLITS[kind])
    means = 2.0 * torch.randn(n, C, 1, 1, generator=gen, dtype=torch.float64)
    scales = 0.5 + 2.0 * torch.rand(n, C, 1, 1, generator=gen, dtype=torch.float64)
    x = means + scales * torch.randn(n, C, 4, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def run_layer(layer: nn.Module, kind: str, rows: slice) -> dict[str, object]:
    """STEPS training steps on ``rows`` of each step's batch, then one eval forward; what the comparison needs."""
    seen: dict[str, object] = {"y": [], "dx": [], "grads": []}
    memory_format = torch.channels_last if kind.endswith("_nhwc") else torch.contiguous_format
    for step in range(STEPS):
        x, weights = batch(kind, step)
        x = x[rows].contiguous(memory_format=memory_format).requires_grad_()
        y = layer(x)
        (y * weights[rows].contiguous(memory_format=memory_format)).sum().backward()
        seen["y"].append(y.detach())
        seen["dx"].append(x.grad)
        seen["grads"].append({name: p.grad.clone() for name, p in layer.named_parameters()})
        layer.zero_grad()
    seen["buffers"] = {name: b.clone() for name, b in layer.named_buffers()}
    with torch.no_grad():
        seen["eval"] = layer.eval()(batch(kind, STEPS)[0][rows])
    return seen


def make_model() -> nn.Module:
    """A conv between every two norm layers: one calibrating layer per code path, fused and plain in turn, and the
    user's variant (autograd) last."""
    torch.manual_seed(3)
    layers: list[nn.Module] = [nn.Conv2d(C, 4, 3, padding=1)]
    for index, name in enumerate(distinct_forms("calibrated")):
        layers += [factory(name, fused=index % 2 == 0)(4), nn.Conv2d(4, 4, 1)]
    layers += [nn.Conv2d(4, C, 1), ScaledBatchNorm2d(C)]
    return nn.Sequential(*layers).double().train()


def train_model(model: nn.Module, rows: slice, loss_scale: float) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, weights = batch("model", step)
        optimizer.zero_grad()
        (model(x[rows]) * weights[rows]).sum().mul(loss_scale).backward()
        optimizer.step()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def shard(kind: str, rank: int) -> slice:
    first = SPLITS[kind][0]
    return slice(0, first) if rank == 0 else slice(first, sum(SPLITS[kind]))


# ---- the 2-process job ------------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in LAYERS:
            results[kind] = run_layer(tb.convert_sync_batchnorm(make_layer(kind)), kind, shard(kind, rank))
        # DDP averages gradients over ranks: a rank's loss is its shard's sum, so the reference loss is the mean
        model = DistributedDataParallel(tb.convert_sync_batchnorm(make_model()))
        results["model"] = train_model(model, shard("model", rank), loss_scale=1.0)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync")
    context = mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    try:
        for _ in range(120):  # a collective that never completes must fail the test, not hang the suite
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the 2-process sync job did not finish in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_synced_layer_on_two_processes_equals_one_process_on_the_full_batch(kind, ranks):
    reference = make_layer(kind)
    full = run_layer(reference, kind, slice(None))
    got = [ranks[rank][kind] for rank in range(WORLD)]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["y"][step] for r in got]), full["y"][step], **TOL)
        torch.testing.assert_close(torch.cat([r["dx"][step] for r in got]), full["dx"][step], **TOL)
        for name, grad in full["grads"][step].items():
            torch.testing.assert_close(got[0]["grads"][step][name] + got[1]["grads"][step][name], grad, **TOL,
                                       msg=f"step {step} ∂L/∂{name}")
    for rank in range(WORLD):  # every rank holds the full batch's running statistics (and σ_prev), not its own
        assert set(got[rank]["buffers"]) == set(full["buffers"])
        for name, buffer in full["buffers"].items():
            torch.testing.assert_close(got[rank]["buffers"][name], buffer, **TOL, msg=f"rank {rank} {name}")
    torch.testing.assert_close(torch.cat([r["eval"] for r in got]), full["eval"], **TOL)


def test_synced_statistics_differ_from_per_rank_ones(ranks):
    # the comparison above could not pass by accident: a rank's own half gives other running statistics
    alone = make_layer("iebn")
    run_layer(alone, "iebn", shard("iebn", 0))
    assert not torch.allclose(alone.running_var, ranks[0]["iebn"]["buffers"]["running_var"], rtol=1e-3)


def test_ddp_training_with_synced_variants_equals_one_process(ranks):
    want = train_model(make_model(), slice(None), loss_scale=1.0 / WORLD)
    for rank in range(WORLD):
        assert set(ranks[rank]["model"]) == set(want)
        for name, tensor in want.items():
            torch.testing.assert_close(ranks[rank]["model"][name], tensor, **TOL, msg=f"rank {rank} {name}")


# ---- conversion (one process) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", distinct_forms("plain"))
def test_sync_conversion_keeps_plain_bn_variants(name):
    reference = factory(name)(4)
    if isinstance(reference, tb.BatchNormGamma2d):
        assert reference.gamma_lr_div == 100  # Davis & Frank's c
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm,
                    tb.convert_sync_batchnorm):
        model = tb.create_model("resnet18", name)
        gammas = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        synced = convert(model)
        layers = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert layers and all(isinstance(m, tb.SyncBatchNormGamma) and m.gamma_lr_div == reference.gamma_lr_div
                              for m in layers)
        assert len(layers) == len(gammas) and all(torch.equal(m.weight, g) for m, g in zip(layers, gammas))
        if reference.gamma_init_value is not None:
            assert all(torch.all(m.weight == reference.gamma_init_value) for m in layers)
        groups = {g["name"]: g for g in tb.param_groups(synced)}
        assert groups["bn_gamma"]["lr_scale"] == 1 / reference.gamma_lr_div
        assert len(groups["bn_gamma"]["params"]) == len(layers)
    fused = timm.layers.convert_sync_batchnorm(tb.create_model("efficientnet_b0", name))
    assert isinstance(fused.bn1, tb.SyncBatchNormGammaAct) and isinstance(fused.bn1.act, nn.SiLU)


@pytest.mark.parametrize("name", distinct_forms("calibrated"))
def test_sync_conversion_keeps_calibrated_variants_and_switches_on_their_sync(name):
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm,
                    tb.convert_sync_batchnorm):
        model = tb.create_model("resnet18", name)
        before = {key: (type(m), m.extra_repr()) for key, m in model.named_modules()}
        keys = list(model.state_dict())
        synced = convert(model)
        layers = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(layers) == 20 and all(m.sync_batch_stats and m.process_group is None for m in layers)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in layers)
        assert {key: type(m) for key, m in synced.named_modules()} == {key: t for key, (t, _) in before.items()}
        assert list(synced.state_dict()) == keys
        reprs = {key: m.extra_repr() for key, m in synced.named_modules() if isinstance(m, BatchNormVariant)}
        assert len(reprs) == 20 and all("sync_batch_stats=True" in text and "sync" not in before[key][1]
                                        for key, text in reprs.items())


@pytest.mark.parametrize("kind", [*distinct_forms("calibrated"), "user_scaled"])
def test_synced_layer_without_a_process_group_is_the_local_layer(kind):
    # sync_batch_stats only takes effect in an initialised world of > 1 processes
    assert not dist.is_initialized()
    plain, synced = make_layer(kind), tb.convert_sync_batchnorm(make_layer(kind))
    assert synced.sync_batch_stats and not plain.sync_batch_stats
    a, b = run_layer(plain, kind, slice(None)), run_layer(synced, kind, slice(None))
    for step in range(STEPS):
        torch.testing.assert_close(b["y"][step], a["y"][step], rtol=0, atol=0)
        torch.testing.assert_close(b["dx"][step], a["dx"][step], rtol=0, atol=0)
    torch.testing.assert_close(b["buffers"], a["buffers"], rtol=0, atol=0)


def test_sync_conversion_refuses_a_foreign_variant():
    class OwnVariant(BatchNormVariant, nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), OwnVariant(4))
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm):
        with pytest.raises(tb.VariantSyncError, match=r"1 norm layers .*: 1 \(OwnVariant\)\. Drop sync_bn=true"):
            convert(model)


def test_sync_conversion_follows_what_a_users_class_is():
    class OwnGamma(tb.BatchNormGamma2d):  # plain BN at run time, another γ0: converts like the built-in
        def _init_gamma(self, weight):
            weight.fill_(0.3)

    class OwnForward(tb.BatchNormGamma2d):  # no longer BN's forward: converting to SyncBatchNorm would drop it
        def forward(self, x):
            return 2.0 * super().forward(x)

    synced = tb.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), OwnGamma(4), ScaledBatchNorm2d(4)))
    assert isinstance(synced[1], tb.SyncBatchNormGamma) and torch.all(synced[1].weight == 0.3)
    assert type(synced[2]) is ScaledBatchNorm2d and synced[2].sync_batch_stats
    assert [tb.sync.sync_kind(m) for m in (OwnGamma(2), ScaledBatchNorm2d(2), OwnForward(2))] == [
        "batchnorm", "calibrated", None]
    with pytest.raises(tb.VariantSyncError, match=r"1 norm layers .*: 1 \(OwnForward\)\. Drop sync_bn=true"):
        tb.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), OwnForward(4)))


def test_sync_conversion_of_plain_models_is_unchanged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("resnet18"))
    assert {type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {nn.SyncBatchNorm}
