"""``scripts/export.py``: a finished run as a timm model folder that ``timm.create_model("local-dir:...",
pretrained=True)`` loads, after ``import timm_bninit``, to the outputs of the model the run evaluated; what timm's
config cannot express is exported so that it loads to the same outputs, or refused in one line; ``--push`` without a
reachable hub is one line too."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from fake_datasets import tiny_config
from fake_runs import CLASS_NAMES, assert_other_outputs, assert_same_outputs, fake_finished_run, fixed_pixels
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_model_data_config
from torch import nn

import timm_bninit as tb
from timm_bninit.experiment import layout
from timm_bninit.experiment.cli import export_main
from timm_bninit.experiment.export import ExportError, export_run, fold_input_bn
from timm_bninit.experiment.loaders import build_transforms, eval_data_config
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.train import run_finetune

ROOT = Path(__file__).resolve().parent.parent


def normalised(pixels: torch.Tensor, data_config: dict) -> torch.Tensor:
    """What timm's Normalize gives each model: pixels through its own data config's mean and std."""
    mean = torch.tensor(data_config["mean"], dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean) / torch.tensor(data_config["std"], dtype=pixels.dtype).view(1, -1, 1, 1)


@torch.no_grad()
def outputs_through_own_config(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.eval()(normalised(pixels, resolve_model_data_config(model)))


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("changes", [{"augmentation": "none"}, {"augmentation": "resize20_crop"},
                                     {"augmentation": "flip", "img_size": 160}, {"input_bn": True}])
def test_the_recorded_data_config_rebuilds_the_run_eval_transform_with_timm(tmp_path, changes):
    config = tiny_config(tmp_path, tmp_path, **changes)
    model = build_model(config, 3)
    recorded = eval_data_config(config, model)
    expected_transform = build_transforms(config, model)[1]
    timm_transform = create_transform(**json.loads(json.dumps(recorded)))  # as config.json hands it back
    generator = torch.Generator().manual_seed(0)
    for size in ((37, 23), (300, 211), (16, 16)):
        array = torch.randint(0, 256, (*size[::-1], 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(array)
        assert torch.equal(timm_transform(image), expected_transform(image)), (changes, size)
    if changes.get("augmentation") == "resize20_crop":  # timm's squash: resize to floor(size / crop_pct) = 20
        assert recorded["crop_mode"] == "squash" and math.floor(16 / recorded["crop_pct"]) == 20


def test_folding_the_input_bn_is_the_eval_mode_bn():
    bn = nn.BatchNorm2d(2, eps=0.0).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, 0.125]))  # exact in float32, as every value here
        bn.running_var.copy_(torch.tensor([0.25, 4.0]))
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([1.0, 0.0]))
    # by hand, channel 0 on raw pixels: σ = 0.5, s' = σ/γ = 0.25, m' = μ − β·σ/γ = 0.5 − 0.25 = 0.25
    mean, std = fold_input_bn(bn, (0.0, 0.0), (1.0, 1.0))
    assert mean[0] == pytest.approx(0.25, abs=1e-15) and std[0] == pytest.approx(0.25, abs=1e-15)
    assert mean[1] == pytest.approx(0.125, abs=1e-15) and std[1] == pytest.approx(4.0, abs=1e-15)  # σ = 2, γ = 0.5
    # composed with an earlier (m0, s0) normalisation, checked against BN itself in float64
    bn.eps = 1e-5
    mean, std = fold_input_bn(bn, (0.4, 0.6), (0.2, 0.3))
    pixels = torch.rand(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = bn.double()(normalised(pixels, {"mean": (0.4, 0.6), "std": (0.2, 0.3)}))
    torch.testing.assert_close(normalised(pixels, {"mean": mean, "std": std}), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        bn.weight[1] = -0.5
    with pytest.raises(ExportError, match=r"γ = \[2.0, -0.5\]: a γ ≤ 0 cannot be folded") as error:
        fold_input_bn(bn, (0.0, 0.0), (1.0, 1.0))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def exported_run(tiny_data, tmp_path_factory):
    """A real run with what timm's config cannot name (the CIFAR stem, the official input BN), exported by the
    command line."""
    base = tmp_path_factory.mktemp("export")
    config = tiny_config(tiny_data, base, model="resnet18", cifar_stem=True, input_bn=True, norm_layer="bn_gamma01",
                         epochs=2)
    final = run_finetune(config, base / "run", quiet=True, data_cache_dir=base / "cache")
    assert export_main([str(base / "run"), str(base / "out")]) == 0
    return config, final, base / "run", base / "out"


def test_the_exported_folder_loads_in_timm_to_the_run_outputs_on_images(exported_run, tiny_data):
    config, _, run_dir, out = exported_run
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    run_model = tb.load_run(run_dir)
    # images through each one's own preprocessing: the run's eval transform, and timm's from the exported config
    images = [Image.open(path).convert("RGB") for path in sorted((tiny_data / "folder" / "test").rglob("*.png"))]
    run_transform = build_transforms(config, build_model(config, 3))[1]
    timm_transform = create_transform(**resolve_model_data_config(loaded))
    with torch.no_grad():
        expected = run_model(torch.stack([run_transform(image) for image in images]))
        got = loaded(torch.stack([timm_transform(image) for image in images]))
    assert_same_outputs(got, expected)
    # without the folded mean and std (the run's [0, 1] pixels), the exported network computes something else
    assert_other_outputs(loaded(torch.stack([run_transform(image) for image in images])).detach(), expected)


def test_config_json_and_model_card_say_what_timm_and_a_reader_need(exported_run):
    _, final, _, out = exported_run
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    written = json.loads((out / "config.json").read_text())
    assert written["architecture"] == "resnet18_cifar_stem" and written["num_classes"] == 3
    assert written["label_names"] == CLASS_NAMES
    assert written["model_args"]["norm_layer"] == "bn_gamma01" and written["model_args"]["num_classes"] == 3
    cfg = written["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center"
    assert all(s > 0 for s in cfg["std"]) and cfg["std"] != [1.0, 1.0, 1.0]  # the folded input BN
    assert not {"hf_hub_id", "url", "file", "tag"} & set(cfg)  # nothing of timm's published resnet18 weights
    assert set(load_file(out / "model.safetensors")) == set(timm.create_model(
        "resnet18_cifar_stem", norm_layer="bn_gamma01", num_classes=3).state_dict())
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: timm" in front and "license: apache-2.0" in front and "- timm-bninit" in front
    assert "- bn_gamma01" in front and "pipeline_tag: image-classification" in front
    for expected in ("`bn_gamma01`, every BN of the network: `BatchNormGamma2d(", "gamma_init=0.1",
                     "γ learning rate:** base / 100", "trained from scratch (`bn_transfer` does not apply)",
                     f"{final['test_acc_at_best_val']:.2f}", f"{final['test_acc_last']:.2f}",
                     f"epoch {final['best_epoch']} of 2", "folded into `pretrained_cfg`'s `mean` and `std`",
                     "resnet18_cifar_stem", "input_bn: true", "cifar_stem: true", f'"local-dir:{out}"'):
        assert expected in card, expected


@pytest.mark.slow
def test_a_fresh_process_loads_the_folder_after_import_timm_bninit(exported_run, tmp_path):
    _, _, run_dir, out = exported_run
    script = ("import sys, timm, torch, timm_bninit\n"
              "model = timm.create_model(f'local-dir:{sys.argv[1]}', pretrained=True).eval()\n"
              "mean = torch.tensor(model.pretrained_cfg['mean']).view(1, -1, 1, 1)\n"
              "std = torch.tensor(model.pretrained_cfg['std']).view(1, -1, 1, 1)\n"
              "pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(123))\n"
              "torch.save(model((pixels - mean) / std).detach(), sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "out.pt")], env=env, check=True,
                   timeout=300)
    with torch.no_grad():
        assert_same_outputs(torch.load(tmp_path / "out.pt"), tb.load_run(run_dir)(fixed_pixels(16)))


def test_an_export_never_overwrites_by_accident(exported_run, tmp_path, capsys):
    _, _, run_dir, out = exported_run
    assert export_main([str(run_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; choose a new folder, or pass --overwrite" in err
    assert export_main([str(run_dir), str(out), "--overwrite", "--which", "last"]) == 0
    assert "epoch 2 of 2" in (out / "README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert export_main([str(run_dir), str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "holds files an export does not write (notes.txt)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".mine.*")) and not list(out.parent.glob(f".{out.name}.*"))  # no staging left


@pytest.mark.parametrize("environment", [{"HF_HUB_OFFLINE": "1"},
                                         {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token"}],
                         ids=["offline", "unreachable"])
def test_push_without_a_reachable_hub_is_one_line(exported_run, tmp_path, environment):
    _, _, run_dir, _ = exported_run
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    # HF_HOME in the test folder: no saved login of this machine is read
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), **environment)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(run_dir), str(tmp_path / "out"),
                             "--push", "someone/bn-gamma01-tiny"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: could not push") and result.stderr.count("\n") == 1, result.stderr
    assert "someone/bn-gamma01-tiny" in result.stderr and "the export in" in result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["README.md", "config.json",
                                                                           "model.safetensors"]
    assert '"hf-hub:someone/bn-gamma01-tiny"' in (tmp_path / "out" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ variant matrix


VARIANTS = [None, *tb.list_norm_layers()]


@pytest.mark.parametrize("norm_layer", VARIANTS)
def test_every_variant_exports_to_what_the_run_evaluated(tmp_path, norm_layer):
    # the run itself is not under test here: a finished run directory with every norm tensor given its own value
    config = tiny_config(tmp_path, tmp_path, norm_layer=norm_layer, gamma_lr_div=1.0 if norm_layer else None)
    model = fake_finished_run(tmp_path / "run", config)
    pixels = fixed_pixels(16)
    with torch.no_grad():
        run_outputs = model(normalised(pixels, eval_data_config(config, model)))
        assert_same_outputs(tb.load_run(tmp_path / "run")(normalised(pixels, eval_data_config(config, model))),
                            run_outputs)
    export = export_run(tmp_path / "run", tmp_path / "out")
    assert export.model_args == {"num_classes": 3, **({"norm_layer": norm_layer} if norm_layer else {})}
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert_same_outputs(outputs_through_own_config(loaded, pixels), run_outputs)


def test_options_that_act_only_in_training_change_nothing_and_identity_init_is_carried(tmp_path):
    pixels = fixed_pixels(16)
    # gamma_init and the γ learning rate only set up training: the layer named by the recipe computes the same
    config = tiny_config(tmp_path, tmp_path, norm_layer="bn_gamma1", gamma_init=0.731, gamma_lr_div=1.0)
    model = fake_finished_run(tmp_path / "gamma", config)
    export_run(tmp_path / "gamma", tmp_path / "gamma-out")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'gamma-out'}", pretrained=True)
    assert_same_outputs(outputs_through_own_config(loaded, pixels),
                        model(normalised(pixels, eval_data_config(config, model))).detach())
    card = (tmp_path / "gamma-out" / "README.md").read_text()
    assert "γ0 (recipe `gamma_init`):** 0.731 (initialisation only)" in card and "base / 1 (recipe" in card
    # the blended σ's α acts only in training: the weights of an α = 0.5 run give the same outputs at any α
    model = fake_finished_run(tmp_path / "blend", tiny_config(tmp_path, tmp_path, norm_layer="bn_blend05"))
    other_alpha = timm.create_model("test_resnet", norm_layer="bn_blend09", num_classes=3)
    other_alpha.load_state_dict(model.state_dict())
    assert_same_outputs(other_alpha.eval()(pixels), model(pixels).detach())
    # identity_init changes the forward: the exported name keeps it, and the same weights without it differ
    model = fake_finished_run(tmp_path / "unit", tiny_config(tmp_path, tmp_path, norm_layer="rbn_unit"))
    export_run(tmp_path / "unit", tmp_path / "unit-out")
    written = json.loads((tmp_path / "unit-out" / "config.json").read_text())
    assert written["model_args"]["norm_layer"] == "rbn_unit"
    without = timm.create_model("test_resnet", norm_layer="rbn", num_classes=3)
    without.load_state_dict(model.state_dict())
    assert_other_outputs(without.eval()(pixels).detach(), model(pixels).detach())


def test_a_family_without_norm_layer_exports_plain_forward_variants_and_refuses_the_others(tmp_path):
    pixels = fixed_pixels(16)
    config = tiny_config(tmp_path, tmp_path, model="mobilenetv3_small_050", norm_layer="bn_gamma01")
    model = fake_finished_run(tmp_path / "gamma", config)
    export = export_run(tmp_path / "gamma", tmp_path / "gamma-out")
    assert export.model_args == {"num_classes": 3} and "takes no `norm_layer=`" in export.notes[0]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'gamma-out'}", pretrained=True)
    assert_same_outputs(outputs_through_own_config(loaded, pixels),
                        model(normalised(pixels, eval_data_config(config, model))).detach())
    fake_finished_run(tmp_path / "rbn", replace(config, norm_layer="rbn"))
    with pytest.raises(ExportError, match="timm's config cannot express this model") as error:
        export_run(tmp_path / "rbn", tmp_path / "rbn-out")
    assert "\n" not in str(error.value) and not (tmp_path / "rbn-out").exists()


def test_what_cannot_be_expressed_is_refused_in_one_line(tmp_path, capsys):
    # a run that is not finished
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    layout.write_config(unfinished, tiny_config(tmp_path, tmp_path))
    assert export_main([str(unfinished), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "holds no finished run (status: pending" in err
    # the CIFAR stem on a ResNet no timm name is registered for (test_cifar_stem registers resnet26's: not this one)
    fake_finished_run(tmp_path / "stem", tiny_config(tmp_path, tmp_path, model="seresnet18", cifar_stem=True))
    assert export_main([str(tmp_path / "stem"), str(tmp_path / "stem-out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "register 'seresnet18_cifar_stem' with timm_bninit.register_cifar_stem_model" in err
    # an input BN with a γ ≤ 0 is no mean/std normalisation
    run_dir = tmp_path / "negative"
    fake_finished_run(run_dir, tiny_config(tmp_path, tmp_path, input_bn=True))
    for name in (layout.BEST_MODEL_FILE, layout.LAST_MODEL_FILE):
        state = load_file(run_dir / name)
        state["input_bn.weight"][1] = -0.2
        save_file(state, str(run_dir / name))
    assert export_main([str(run_dir), str(tmp_path / "negative-out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a γ ≤ 0 cannot be folded into pretrained_cfg's mean and std" in err
    assert not any((tmp_path / name).exists() for name in ("out", "stem-out", "negative-out"))


# ------------------------------------------------------------------------------------------------ sweeps


def _fake_sweep(out: Path, config, values: dict[str, list[float]]) -> None:
    plan = []
    for method, accuracies in values.items():
        for seed, accuracy in enumerate(accuracies, start=1):
            run_dir = layout.sweep_run_dir(out, method, config.lr, seed)
            norm_layer = None if method == "base" else method
            fake_finished_run(run_dir, replace(config, norm_layer=norm_layer, seed=seed),
                              final={"test_acc_at_best_val": accuracy})
            plan.append({"method": method, "lr": config.lr, "seed": seed, "recipe": "demo",
                         "dataset": config.dataset, "run_dir": os.path.relpath(run_dir, out)})
    layout.write_plan(out, plan)


def test_a_run_of_a_sweep_carries_its_method_row_of_the_report(tmp_path):
    config = tiny_config(tmp_path, tmp_path)
    _fake_sweep(tmp_path / "sweep", config, {"base": [50.0, 60.0], "bn_gamma01": [55.0, 70.0]})
    export_run(layout.sweep_run_dir(tmp_path / "sweep", "bn_gamma01", config.lr, 1), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    sweep = card.split("## Sweep\n")[1]
    # by hand: base 55 ± 7.07 (sd of 50, 60), bn_gamma01 62.5 ± 10.61; paired differences 5, 10: t = 7.5 /
    # (3.536/√2) = 3 on 1 degree of freedom, whose t is Cauchy: p = 1/2 − arctan(3)/π = 0.102
    assert "seed 1 of `bn_gamma01` at lr 0.05" in sweep
    assert "| base (baseline) | 55.00 ± 7.07 (2) | — |" in sweep
    assert f"| bn_gamma01 | 62.50 ± 10.61 (2) | {0.5 - math.atan(3) / math.pi:.3g} |" in sweep
    # a sweep with a planned run that has no result has no report yet: the card says why
    _fake_sweep(tmp_path / "open", config, {"base": [50.0, 60.0], "bn_gamma01": [55.0, 70.0]})
    layout.write_plan(tmp_path / "open", [{"method": "base", "lr": config.lr, "seed": 3, "recipe": "demo",
                                           "dataset": config.dataset, "run_dir": "base/lr0.05/seed3"}])
    export_run(layout.sweep_run_dir(tmp_path / "open", "base", config.lr, 2), tmp_path / "open-out")
    card = (tmp_path / "open-out" / "README.md").read_text()
    assert "Its report is not available: 1 of 5 planned runs have no result" in card
