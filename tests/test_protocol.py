"""``protocol: official`` (Davis & Frank's code), ``input_bn`` and ``train_per_class``, each point against values
written out here; and ``build_training`` against what a real run starts with."""

import json
import math
from dataclasses import replace

import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from torchvision.transforms.functional import to_tensor

import timm_bninit as tb
from timm_bninit.experiment.analysis import freeze_all_but_norm
from timm_bninit.experiment.loaders import build_transforms
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.protocol import InputBatchNorm, train_per_class_subset
from timm_bninit.experiment.recipe import RecipeError, apply_overrides, check_config, load_recipe
from timm_bninit.experiment.train import _load_data, build_run, run_finetune

OFFICIAL = {"protocol": "official", "model": "resnet18", "img_size": 32}


def official(**overrides):
    return tb.build_training("demo", num_classes=10, train_size=1280, **{**OFFICIAL, **overrides})


def _bns(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


# --- the optimizer and its schedule -------------------------------------------------------------------------------

def test_optimizer_is_plain_momentum_sgd():
    training = official(lr=0.1)
    optimizer = training.optimizer
    assert type(optimizer) is torch.optim.SGD
    assert training.config.optimizer == "momentum"  # recorded in the run's config
    for group in optimizer.param_groups:
        assert group["nesterov"] is False and group["momentum"] == 0.9 and group["dampening"] == 0
    assert tb.build_training("demo", num_classes=10, train_size=1280).optimizer.defaults["nesterov"] is True  # timm's


@pytest.mark.parametrize("norm_layer, c", [("bn_gamma01", 100.0), (None, 1.0)])
def test_lr_is_the_per_epoch_cosine_with_floor_1e8(norm_layer, c):
    lr, epochs = 0.1, 7
    training = official(lr=lr, epochs=epochs, norm_layer=norm_layer)
    assert training.config.step_on_epochs is True and training.config.warmup_epochs == 0
    groups = {g["name"]: g for g in training.optimizer.param_groups}
    updates = 0
    for epoch in range(epochs):
        expected = 1e-8 + 0.5 * (lr - 1e-8) * (1 + math.cos(math.pi * epoch / epochs))
        for _ in range(3):  # the run loop's per-update call must leave a per-epoch schedule alone
            assert groups["decay"]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
            assert groups["no_decay"]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
            assert groups["bn_gamma"]["lr"] == pytest.approx(expected / c, rel=1e-12, abs=0)
            updates += 1
            training.scheduler.step_update(num_updates=updates)
        training.scheduler.step(epoch + 1)
    assert expected == pytest.approx(1e-8 + 0.5 * (0.1 - 1e-8) * (1 + math.cos(math.pi * 6 / 7)))


# --- the init ----------------------------------------------------------------------------------------------------

def test_conv_weights_are_kaiming_normal_fan_in():
    model = official(norm_layer="bn_gamma01").model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20  # resnet18: stem, 16 block convs, 3 downsample convs
    assert any(m.in_channels != m.out_channels for m in convs)  # where fan_in ≠ fan_out, so fan_out would fail
    for conv in convs:
        weight = conv.weight.detach().double().flatten()
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        sigma, n = math.sqrt(2.0 / fan_in), weight.numel()
        # sample std of n normal draws: standard error σ/√(2n); sample mean: σ/√n. Five standard errors each.
        assert abs(float(weight.std()) - sigma) < 5 * sigma / math.sqrt(2 * n), (conv, float(weight.std()), sigma)
        assert abs(float(weight.mean())) < 5 * sigma / math.sqrt(n)
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if fan_out != fan_in:
            assert abs(float(weight.std()) - math.sqrt(2.0 / fan_out)) > 5 * sigma / math.sqrt(2 * n)


def test_linear_weight_is_pytorch_default_and_every_bias_is_zero():
    model = official(norm_layer="bn_gamma01").model
    fc = model.get_classifier()
    bound = 1 / math.sqrt(512)  # kaiming-uniform a = √5: U(±1/√fan_in), variance bound²/3
    weight = fc.weight.detach().double().flatten()
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.99 * bound
    # sd of the sample variance of n uniform draws: √((μ4 − σ⁴)/n), μ4 = bound⁴/5, σ² = bound²/3
    n, variance = weight.numel(), bound**2 / 3
    assert abs(float(weight.var()) - variance) < 5 * math.sqrt((bound**4 / 5 - variance**2) / n)
    assert torch.equal(fc.bias, torch.zeros(10))
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
    timm_default = tb.build_training("demo", num_classes=10, train_size=1280, model="resnet18").model
    assert torch.count_nonzero(timm_default.get_classifier().bias) > 0  # timm's own init: what the protocol changes


@pytest.mark.parametrize("norm_layer, gamma0", [("bn_gamma01", 0.1), ("bn_gamma005", 0.05), (None, 1.0)])
def test_every_bn_starts_at_gamma0_with_zero_beta(norm_layer, gamma0):
    model = official(norm_layer=norm_layer).model
    bns = _bns(model)
    names = {n for n, _ in bns}
    assert len(bns) == 20 and {"layer1.0.bn2", "layer4.1.bn2", "layer2.0.downsample.1"} <= names  # last BNs too
    for name, bn in bns:
        assert torch.equal(bn.weight, torch.full_like(bn.weight, gamma0)), name
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias)), name


def test_within_a_seed_every_non_norm_tensor_is_shared_across_methods():
    models = {name: official(norm_layer=name, seed=3).model for name in (None, "bn_gamma01", "rbn", "iebn")}
    states = {name: model.state_dict() for name, model in models.items()}
    bn_names = {n for n, _ in _bns(models[None])}
    shared = [k for k in states[None] if k.rpartition(".")[0] not in bn_names]
    assert len(shared) == 22 and "conv1.weight" in shared and "fc.bias" in shared  # 20 convs + fc
    for name, state in states.items():
        assert all(torch.equal(state[k], states[None][k]) for k in shared), name
    other = official(norm_layer=None, seed=4).model.state_dict()
    assert not torch.equal(other["layer1.0.conv1.weight"], states[None]["layer1.0.conv1.weight"])


# --- the input BN ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_layer, gamma0, c", [("bn_gamma01", 0.1, 100.0), (None, 1.0, 1.0)])
def test_input_bn_starts_at_058_gamma0_and_its_beta_never_moves(norm_layer, gamma0, c):
    training = tb.build_training("demo", num_classes=3, train_size=48, protocol="official", input_bn=True,
                                 norm_layer=norm_layer, model="test_resnet", img_size=16, batch_size=8, lr=0.5)
    model, optimizer = training.model, training.optimizer
    assert isinstance(model, InputBatchNorm) and model.input_bn.num_features == 3
    assert torch.equal(model.input_bn.weight, torch.full((3,), 0.58 * gamma0))
    assert model.input_bn.bias is None  # no β: BatchNorm shifts by 0, and nothing can train it
    assert all(p is not None for p in model.input_bn.parameters()) and len(list(model.input_bn.parameters())) == 1
    gamma_group = next(g for g in optimizer.param_groups if any(p is model.input_bn.weight for p in g["params"]))
    assert gamma_group["name"] == "bn_gamma" and gamma_group["lr"] == pytest.approx(0.5 / c, rel=1e-12)
    start = model.input_bn.weight.detach().clone()
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.input_bn.weight, start)  # γ trains
    shifted = model.input_bn(images).detach().mean(dim=(0, 2, 3))  # in train mode: the per-channel mean is β
    assert model.input_bn.bias is None and float(shifted.abs().max()) < 1e-6
    freeze_all_but_norm(model, train_classifier=False)  # BN-only training: still no β
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("input_bn")] == \
        ["input_bn.weight"]
    assert tb.convert_sync_batchnorm(model).input_bn.bias is None  # sync_bn keeps it too
    assert model.get_classifier() is model.model.get_classifier()  # timm's API reaches through the wrapper
    assert model.pretrained_cfg["mean"] == model.model.pretrained_cfg["mean"]


def test_input_bn_sees_unnormalised_pixels():
    config = apply_overrides(load_recipe("demo"), ["input_bn=true", "img_size=16", "augmentation=flip"])
    model = build_model(config, 3)
    image = Image.new("RGB", (16, 16), (200, 10, 90))
    train_transform, eval_transform = build_transforms(config, model)
    assert torch.equal(eval_transform(image), to_tensor(image))
    assert torch.equal(train_transform(image), to_tensor(image))  # a flip of a flat image is the image
    normalised = build_transforms(apply_overrides(config, ["input_bn=false"]), model)[1](image)
    assert not torch.allclose(normalised, to_tensor(image))


def _official_groups(model):
    """Davis & Frank's rule (weight_decay_and_learning_rate.py), written out: 1-D `weight` → lr/c, no decay; other
    1-D → no decay; the rest decay."""
    decay, no_decay, gamma = set(), set(), set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.squeeze().dim() == 1:
            (gamma if "weight" in name else no_decay).add(id(param))
        else:
            decay.add(id(param))
    return decay, no_decay, gamma


@pytest.mark.parametrize("input_bn", [False, True])
@pytest.mark.parametrize("norm_layer, c", [("bn_gamma01", 100.0), (None, 1.0)])
def test_param_groups_agree_with_the_official_rule(input_bn, norm_layer, c):
    training = official(norm_layer=norm_layer, input_bn=input_bn, lr=0.1, weight_decay=1e-4)
    groups = {g["name"]: g for g in training.optimizer.param_groups}
    assert set(groups) == {"decay", "no_decay", "bn_gamma"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert (ids["decay"], ids["no_decay"], ids["bn_gamma"]) == _official_groups(training.model)
    assert len(ids["bn_gamma"]) == 20 + input_bn and len(ids["no_decay"]) == 20 + 1  # β of every BN, fc bias
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0
    assert groups["bn_gamma"]["weight_decay"] == 0 and groups["bn_gamma"]["lr"] == pytest.approx(0.1 / c, rel=1e-12)


# --- the recipe keys ---------------------------------------------------------------------------------------------

def test_official_pins_its_keys_and_refuses_conflicts_before_any_work(tmp_path):
    config = apply_overrides(load_recipe("demo"), ["protocol=official"])
    assert (config.optimizer, config.sched, config.step_on_epochs, config.min_lr) == \
        ("momentum", "cosine", True, 1e-8)
    recipe = tmp_path / "conflict.yaml"
    recipe.write_text("protocol: official\noptimizer: sgd\n")
    with pytest.raises(RecipeError, match=r"protocol 'official' sets optimizer='momentum'.*got 'sgd'") as error:
        load_recipe(recipe)
    assert "\n" not in str(error.value)
    recipe.write_text("protocol: official\noptimizer: momentum\nepochs: 3\n")  # the official value is fine
    assert load_recipe(recipe).optimizer == "momentum"
    with pytest.raises(RecipeError, match="sets pretrained=False"):
        apply_overrides(load_recipe("demo"), ["protocol=official", "pretrained=true"])
    with pytest.raises(RecipeError, match="sets warmup_epochs=0"):
        apply_overrides(config, ["warmup_epochs=2"])
    with pytest.raises(RecipeError, match="sets step_on_epochs=True"):
        check_config(replace(config, step_on_epochs=False))  # a config built in code
    with pytest.raises(RecipeError, match="'protocol' expects a string \\(one of timm, official\\)"):
        apply_overrides(config, ["protocol=paper"])
    with pytest.raises(RecipeError, match="'train_per_class' expects an integer ≥ 1"):
        apply_overrides(config, ["train_per_class=0"])
    assert apply_overrides(config, ["protocol=timm", "optimizer=sgd"]).optimizer == "sgd"


def test_train_per_class_keeps_k_per_class_after_the_validation_split(tiny_data, tmp_path):
    base = apply_overrides(load_recipe("demo"), ["dataset=imagefolder", f"data_dir={tiny_data / 'folder'}",
                                                 "val_fraction=0.25", "split_seed=0"])
    full, _ = _load_data(base, tmp_path / "cache")
    assert len(full["train"]) == 27 and len(full["validation"]) == 9  # 12 per class: 9 train + 3 validation
    subset, _ = _load_data(apply_overrides(base, ["train_per_class=4", "seed=9"]), tmp_path / "cache")
    labels = subset["train"]["label"]
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert set(subset["train"]["file"]) <= set(full["train"]["file"])
    assert subset["validation"]["file"] == full["validation"]["file"] and subset["test"]["file"] == full["test"]["file"]
    again = train_per_class_subset(full["train"], 4, split_seed=0)
    assert again["file"] == subset["train"]["file"]  # the run seed plays no part
    assert train_per_class_subset(full["train"], 4, split_seed=1)["file"] != subset["train"]["file"]
    assert len(train_per_class_subset(full["train"], 50, split_seed=0)) == 27  # fewer than k: all kept


# --- build_training is what a run starts with --------------------------------------------------------------------

def _tiny_official(tiny_data, **changes):
    overrides = {"dataset": "imagefolder", "data_dir": str(tiny_data / "folder"), "model": "test_resnet",
                 "img_size": 16, "epochs": 3, "batch_size": 6, "num_workers": 0, "val_fraction": 0.25,
                 "lr": 0.1, "protocol": "official", "input_bn": True, "norm_layer": "bn_gamma01", "seed": 2,
                 "precise_bn_batches": 0, **changes}
    return apply_overrides(load_recipe("demo"), [f"{k}={v}" for k, v in overrides.items()])


def _groups(optimizer):
    return [(g["name"], g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], [tuple(p.shape) for p in g["params"]])
            for g in optimizer.param_groups]


def test_build_training_reads_the_sizes_a_run_trains_on(tiny_data, tmp_path):
    for changes, classes, images in (({}, 3, 27), ({"classes": "[0,2]"}, 2, 18), ({"train_per_class": 4}, 3, 12)):
        config = _tiny_official(tiny_data, **changes)
        training = tb.build_training(config)
        run = build_run(config, Accelerator(cpu=True), tmp_path / "cache")
        assert training.updates_per_epoch == len(run.train_loader) == images // 6, changes
        assert training.model.get_classifier().out_features == classes


def test_build_training_is_what_a_run_starts_with(tiny_data, tmp_path):
    config = _tiny_official(tiny_data)
    training = tb.build_training(config)  # sizes read from the data set
    given = tb.build_training(config, num_classes=3, train_size=27)
    run = build_run(config, Accelerator(cpu=True), tmp_path / "cache")
    assert training.updates_per_epoch == given.updates_per_epoch == len(run.train_loader) == 27 // 6
    for built in (training, given):
        assert _groups(built.optimizer) == _groups(run.optimizer)
        state, run_state = built.model.state_dict(), run.unwrapped.state_dict()
        assert list(state) == list(run_state) and all(torch.equal(state[k], run_state[k]) for k in state)
    run_dir = tmp_path / "run"
    run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for epoch, record in enumerate(metrics):
        started = {g["name"]: g["lr"] for g in given.optimizer.param_groups}
        assert record["lrs"] == pytest.approx(started, rel=1e-12)
        assert record["lr"] == pytest.approx(1e-8 + 0.5 * (0.1 - 1e-8) * (1 + math.cos(math.pi * epoch / 3)))
        given.scheduler.step(epoch + 1)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved values, as the run used them
    assert (written["protocol"], written["optimizer"], written["min_lr"], written["step_on_epochs"]) == \
        ("official", "momentum", 1e-8, True)
