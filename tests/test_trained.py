"""``timm_bninit.load_run``: the trained model of a finished run gives the outputs of the model the run evaluated at
that epoch, held to outputs recorded *during* real runs (plain BN, an identity-start calibrated variant, the official
input BN with the CIFAR stem, BN-only, an EMA, two processes); what it cannot load is refused in one line."""

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from fake_datasets import make_imagefolder, tiny_config
from fake_runs import CLASS_NAMES, assert_other_outputs, assert_same_outputs, fixed_pixels, recorded_evaluations
from ports import free_port

import timm_bninit as tb
from timm_bninit.experiment import layout
from timm_bninit.experiment.layout import RunError
from timm_bninit.experiment.train import run_finetune

ROOT = Path(__file__).resolve().parent.parent

# each a real 3-epoch run on the tiny imagefolder: what load_run must give back is what these runs evaluated
RUNS = {
    "plain": {"norm_layer": None},
    "rbn_unit": {"norm_layer": "rbn_unit"},  # identity_init changes the forward: the name must carry it back
    "input_bn_cifar_stem": {"model": "resnet18", "cifar_stem": True, "input_bn": True, "norm_layer": "bn_gamma01"},
    "bn_only": {"norm_layer": "bn_uniform", "bn_only": True},
    "ema": {"norm_layer": "bn_blend05", "ema": True, "ema_decay": 0.5},
}


@pytest.fixture(scope="module")
def finished_runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    pixels = fixed_pixels(16)
    runs = {}
    for name, changes in RUNS.items():
        with recorded_evaluations(pixels) as recorded:
            final = run_finetune(tiny_config(tiny_data, base, epochs=3, **changes), base / name, quiet=True,
                                 data_cache_dir=base / "cache")
        runs[name] = (base / name, final, recorded)
    return pixels, runs


@pytest.mark.parametrize("name", list(RUNS))
def test_the_loaded_model_gives_what_the_run_evaluated_at_that_epoch(finished_runs, name):
    pixels, runs = finished_runs
    run_dir, final, recorded = runs[name]
    assert len(recorded) == final["epochs"] == 3
    for which, epoch in (("best", final["best_epoch"]), ("last", final["epochs"])):
        model = tb.load_run(run_dir, which=which)
        assert not any(module.training for module in model.modules())
        with torch.no_grad():
            assert_same_outputs(model(pixels), recorded[epoch - 1]["evaluated"])
    # the comparison tells epochs apart: training moved the evaluated outputs from the first epoch to the last
    assert_other_outputs(recorded[0]["evaluated"], recorded[-1]["evaluated"])
    assert model.pretrained_cfg["label_names"] == CLASS_NAMES and model.pretrained_cfg["num_classes"] == 3
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)


def test_the_ema_run_gives_back_the_average_and_input_bn_keeps_pixels(finished_runs):
    _, runs = finished_runs
    recorded = runs["ema"][2]
    # the run evaluated (and saved) the EMA, not its trained weights: loading the wrong one would fail the test above
    assert_other_outputs(recorded[-1]["evaluated"], recorded[-1]["weights"])
    model = tb.load_run(runs["input_bn_cifar_stem"][0])
    assert model.pretrained_cfg["mean"] == (0.0, 0.0, 0.0) and model.pretrained_cfg["std"] == (1.0, 1.0, 1.0)
    assert isinstance(model.model.maxpool, torch.nn.Identity) and model.input_bn.bias is None


@pytest.mark.slow
def test_a_two_process_run_loads_to_what_its_main_process_evaluated(tmp_path):
    make_imagefolder(tmp_path / "folder", counts={"train": 24, "test": 6})
    config = tiny_config(tmp_path, tmp_path, epochs=2, batch_size=8, norm_layer="rbn", sync_bn=True,
                         precise_bn_batches=0, preload=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    # each rank runs the real command line with its evaluation recorded; rank 0 keeps what it recorded
    launcher = tmp_path / "recording_finetune.py"
    launcher.write_text(
        "import os, sys, torch\n"
        "from fake_runs import fixed_pixels, recorded_evaluations\n"
        "from timm_bninit.experiment.cli import finetune_main\n"
        "with recorded_evaluations(fixed_pixels(16)) as recorded:\n"
        "    code = finetune_main(sys.argv[2:])\n"
        "if os.environ.get('RANK', '0') == '0':\n"
        "    torch.save(recorded, sys.argv[1])\n"
        "sys.exit(code)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(launcher), str(tmp_path / "recorded.pt"), "--recipe",
               str(recipe), "--run-dir", str(tmp_path / "run"), "--data-cache-dir", str(tmp_path / "cache"), "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    final = layout.read_final(tmp_path / "run")
    assert final["environment"]["num_processes"] == 2
    recorded = torch.load(tmp_path / "recorded.pt")
    assert len(recorded) == 2
    pixels = fixed_pixels(16)
    for which, epoch in (("best", final["best_epoch"]), ("last", final["epochs"])):
        with torch.no_grad():
            assert_same_outputs(tb.load_run(tmp_path / "run", which)(pixels), recorded[epoch - 1]["evaluated"])
    assert_other_outputs(recorded[0]["evaluated"], recorded[-1]["evaluated"])


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_what_cannot_be_loaded_is_refused_in_one_line(finished_runs, tmp_path):
    _, runs = finished_runs
    plain = runs["plain"][0]
    with pytest.raises(RunError) as error:
        tb.load_run(tmp_path / "nowhere")
    assert "no such folder" in _one_line(error)
    with pytest.raises(tb.BNInitError) as error:
        tb.load_run(plain, which="middle")
    assert "choose 'best'" in _one_line(error)

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(plain / layout.CONFIG_FILE, unfinished)
    shutil.copy(plain / layout.METRICS_FILE, unfinished)
    with pytest.raises(RunError) as error:
        tb.load_run(unfinished)
    assert "holds no finished run (status: interrupted" in _one_line(error)

    # weights that are not the recipe's: another norm layer (its extra tensors are missing), another head
    other = tmp_path / "other"
    shutil.copytree(plain, other)
    config = yaml.safe_load((other / layout.CONFIG_FILE).read_text())
    (other / layout.CONFIG_FILE).write_text(yaml.safe_dump({**config, "norm_layer": "rbn"}))
    with pytest.raises(RunError) as error:
        tb.load_run(other)
    assert "does not fit the model its config.yaml builds (test_resnet, norm_layer=rbn" in _one_line(error)
    assert "keys missing (e.g. conv1.1.centering_weight" in str(error.value)
    (other / layout.CONFIG_FILE).write_text(yaml.safe_dump(config))
    info = layout.read_model_info(other)
    layout.write_model_info(other, [*info["class_names"], "owl"], info["data_config"])
    with pytest.raises(RunError) as error:
        tb.load_run(other)
    assert "of another shape (e.g. fc.weight (3, 96) vs (4, 96)" in _one_line(error)

    # a run finished before the last weights and class names were kept
    (other / layout.LAST_MODEL_FILE).unlink()
    with pytest.raises(RunError) as error:
        tb.load_run(other, which="last")
    assert "no last_model.safetensors" in _one_line(error) and "which='best'" in str(error.value)
    (other / layout.MODEL_INFO_FILE).unlink()
    with pytest.raises(RunError) as error:
        tb.load_run(other)
    assert "no model_info.json" in _one_line(error)


def test_a_class_subset_keeps_its_names_in_output_order(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, epochs=1, classes=[2, 0])
    run_finetune(replace(config), tmp_path / "run", quiet=True, data_cache_dir=tmp_path / "cache")
    model = tb.load_run(tmp_path / "run")
    assert model.pretrained_cfg["label_names"] == ["fox", "cat"]  # label 0 is class 2, relabelled in the given order
    assert model.get_classifier().out_features == 2
