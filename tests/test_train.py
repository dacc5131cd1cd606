"""A run: run directory, seed pairing, resume after a kill, errors before training, trackers."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import StoppedRun
from fake_datasets import kill_after_checkpoint, make_imagefolder, tiny_config
from terminal import default_sigint
from timm.data import create_transform

import timm_bninit as tb
from timm_bninit.data import DatasetError, load_image_dataset
from timm_bninit.experiment.cli import finetune_main
from timm_bninit.experiment.layout import RunError, write_config
from timm_bninit.experiment.loaders import SeededImageDataset
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.recipe import RecipeError
from timm_bninit.experiment.train import run_finetune

ROOT = Path(__file__).resolve().parent.parent


def test_paired_runs_share_init_order_and_augmentation(tiny_data, tmp_path):
    base = tiny_config(tiny_data, tmp_path, norm_layer=None, seed=4)
    models = {name: build_model(replace(base, norm_layer=name), 3) for name in (None, "bn_uniform", "rbn")}
    reference = models[None].state_dict()
    norm_modules = {name for name, m in models[None].named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    shared = [k for k in reference if k.rpartition(".")[0] not in norm_modules]
    assert len(shared) > 10 and "fc.weight" in shared
    for name, model in models.items():
        state = model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in shared), name
    other_seed = build_model(replace(base, seed=5), 3).state_dict()
    assert not torch.equal(other_seed["fc.weight"], reference["fc.weight"])

    data, _ = load_image_dataset("imagefolder", data_dir=tiny_data / "folder", cache_dir=tmp_path / "cache")
    augment = create_transform(16, is_training=True)
    first = SeededImageDataset(data["train"], augment, seed=4)
    second = SeededImageDataset(data["train"], augment, seed=4)
    torch.manual_seed(123)  # global state must not matter
    a = first[3][0]
    torch.rand(1000)
    b = second[3][0]
    assert torch.equal(a, b)
    second.epoch = 1
    assert not torch.equal(a, second[3][0])  # a new draw each epoch


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_everything(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, norm_layer="bn_gamma01")
    run_dir = tmp_path / "run"
    final = run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["norm_layer"] == "bn_gamma01"
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for record in metrics:
        assert record["lr_gamma"] == pytest.approx(record["lr"] / 100, rel=1e-12)
        assert record["images_per_s"] > 0 and record["train_loss"] > 0
    best = max(metrics, key=lambda m: (m["val_acc"], -m["epoch"]))
    assert final["best_epoch"] == best["epoch"] and final["test_acc_at_best_val"] == best["test_acc"]
    assert final["test_acc_last"] == metrics[-1]["test_acc"] and final["selection"] == "validation"
    assert final["environment"]["torch"] == torch.__version__
    assert json.loads((run_dir / "final.json").read_text()) == final
    gammas = json.loads((run_dir / "final_gammas.json").read_text())
    model = build_model(config, 3)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(gammas) == n_bn
    from safetensors.torch import load_file

    assert "fc.weight" in load_file(run_dir / "best_model.safetensors") or any(
        k.endswith("weight") for k in load_file(run_dir / "best_model.safetensors"))
    assert not (run_dir / "checkpoint").exists()  # a finished run keeps its best model, not its resume state


def test_finished_run_is_never_overwritten(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    final = run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    stamp = (run_dir / "final.json").stat().st_mtime_ns
    with pytest.raises(RunError, match="finished run .* never overwritten"):
        run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    assert run_finetune(config, run_dir, resume=True, quiet=True, data_cache_dir=tmp_path / "cache") == final
    assert (run_dir / "final.json").stat().st_mtime_ns == stamp


def test_a_resume_reads_the_run_config_back_and_refuses_another_recipe(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, config)  # a run interrupted before its first checkpoint
    changed = r"started with another recipe \(lr: 0.05 there, 0.1 now; seed: 1 there, 2 now\)"
    with pytest.raises(RunError, match=changed):
        run_finetune(replace(config, lr=0.1, seed=2), run_dir, resume=True, quiet=True)
    assert [path.name for path in run_dir.iterdir()] == ["config.yaml"]  # refused before any work
    # a config.yaml from before a key existed: the key reads back as its default, so the same recipe resumes
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    del recorded["fused_optimizer"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    final = run_finetune(config, run_dir, resume=True, quiet=True, data_cache_dir=tmp_path / "cache")
    assert final["epochs"] == 1 and yaml.safe_load((run_dir / "config.yaml").read_text()) == config.to_dict()


def test_a_resume_that_would_change_the_experiment_is_refused_naming_each_key(tiny_data, tmp_path, stop_after, capsys):
    # the case: a run stopped after its first checkpoint, then --resume --set lr=0.5
    config = tiny_config(tiny_data, tmp_path, epochs=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    run_dir = tmp_path / "run"
    command = ["--recipe", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet",
               "--data-cache-dir", str(tmp_path / "cache")]
    stop_after(1)
    with pytest.raises(StoppedRun):
        finetune_main(command[:4] + command[5:])
    stop_after(None)
    capsys.readouterr()
    free = "preload, num_workers, log_with"
    assert finetune_main([*command, "--set", "lr=0.5", "--set", "epochs=3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {run_dir} was started with another recipe (lr: 0.05 there, 0.5 now; epochs: 2 there, 3 now); resume "
        f"it with the recipe and overrides its config.yaml records (only {free} may differ), or start a new run "
        f"directory"]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]  # refused before anything was touched
    # what cannot change the numbers may change (tests below: workers and preloading give the same run)
    assert finetune_main([*command, "--set", "num_workers=1", "--set", "preload=true"]) == 0
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]
    assert finetune_main([*command, "--set", "lr=0.5"]) == 2  # a finished run's result is its own recipe's
    assert "lr: 0.05 there, 0.5 now" in capsys.readouterr().err


def test_errors_come_before_any_training(tiny_data, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert finetune_main(["--recipe", "demo", "--set", "model=resnet5O", "--run-dir", str(tmp_path / "a"),
                          "--data-cache-dir", cache]) == 2
    assert "unknown timm model 'resnet5O'. Did you mean 'resnet50'" in capsys.readouterr().err
    assert finetune_main(["--recipe", "demo", "--set", "dataset=cub", "--data-dir", str(tmp_path / "nowhere"),
                          "--run-dir", str(tmp_path / "b"), "--data-cache-dir", cache]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert finetune_main(["--recipe", "demo", "--set", "pretrained_file=/no/such.safetensors",
                          "--run-dir", str(tmp_path / "c")]) == 2
    assert "pretrained_file '/no/such.safetensors' does not exist" in capsys.readouterr().err
    assert finetune_main(["--recipe", "demo", "--set", "norm_layer=bn_gama01", "--run-dir", str(tmp_path / "d")]) == 2
    assert "Did you mean 'bn_gamma01'" in capsys.readouterr().err
    assert finetune_main(["--recipe", "nope"]) == 2
    assert not any((tmp_path / d).exists() for d in "abcd")
    with pytest.raises(DatasetError):
        run_finetune(tiny_config(tiny_data, tmp_path, data_dir=str(tmp_path / "missing")), tmp_path / "e",
                     quiet=True, data_cache_dir=tmp_path / "cache")


def test_pretrained_file_and_transfer_policy_in_a_run(tiny_data, tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    config = tiny_config(tiny_data, tmp_path, norm_layer="bn_gamma01", bn_transfer="reset", epochs=1,
                         pretrained_file=str(tmp_path / "weights.pth"), precise_bn_batches=0)
    with pytest.warns(tb.BNTransferWarning):  # nothing re-estimates the stale statistics: say so
        run_finetune(config, tmp_path / "run", quiet=True, data_cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tb.BNTransferWarning)  # the run re-estimates them before every evaluation
        run_finetune(replace(config, precise_bn_batches=2), tmp_path / "run2", quiet=True,
                     data_cache_dir=tmp_path / "cache")
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert report["bn_transfer"] == "reset" and "fc.weight" in report["initialised"]
    assert any(key.endswith(".weight") and "reset" in why for key, why in report["initialised"].items())


def _launch(recipe: Path, run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # output to a file: a pipe nobody reads could fill and block the run
    with open(run_dir.parent / f"{run_dir.name}-{len(extra)}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--recipe", str(recipe),
                                 "--run-dir", str(run_dir), "--data-cache-dir", str(cache), "--quiet", *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)


def _log(run_dir: Path, resumed: bool = False) -> str:
    return (run_dir.parent / f"{run_dir.name}-{int(resumed)}.log").read_text()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path):
    make_imagefolder(tmp_path / "more", counts={"train": 30, "test": 6})
    config = tiny_config(tmp_path.parent, tmp_path, norm_layer="rbn", epochs=6, batch_size=4,
                         data_dir=str(tmp_path / "more"), augmentation="rrc", drop_rate=0.2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    cache = tmp_path / "cache"

    whole = _launch(recipe, tmp_path / "whole", cache)
    assert whole.wait(timeout=300) == 0, _log(tmp_path / "whole")

    killed = _launch(recipe, tmp_path / "killed", cache)
    kill_after_checkpoint(killed, tmp_path / "killed", epoch=2, timeout=240)
    assert not (tmp_path / "killed" / "final.json").exists(), "the run finished before it could be killed"

    # resumed, killed again, and its newest checkpoint then damaged (the truncated weights): the second resume
    # goes on from the previous checkpoint
    resumed = _launch(recipe, tmp_path / "killed", cache, "--resume")
    kill_after_checkpoint(resumed, tmp_path / "killed", epoch=4, timeout=240)
    assert not (tmp_path / "killed" / "final.json").exists(), "the run finished before it could be killed"
    saved = json.loads((tmp_path / "killed" / "checkpoint" / "manifest.json").read_text())["epoch"]
    weights = tmp_path / "killed" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = _launch(recipe, tmp_path / "killed", cache, "--resume")
    assert resumed.wait(timeout=300) == 0, _log(tmp_path / "killed", resumed=True)
    assert f"resuming from checkpoint.previous (epoch {saved - 1})" in _log(tmp_path / "killed", resumed=True)
    expected = json.loads((tmp_path / "whole" / "final.json").read_text())
    got = json.loads((tmp_path / "killed" / "final.json").read_text())
    for key in ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last"):
        assert got[key] == expected[key], key
    whole_metrics = read_metrics(tmp_path / "whole")
    resumed_metrics = read_metrics(tmp_path / "killed")
    assert [m["epoch"] for m in resumed_metrics] == list(range(1, 7))
    assert [m["train_loss"] for m in resumed_metrics] == [m["train_loss"] for m in whole_metrics]
    assert json.loads((tmp_path / "killed" / "final_gammas.json").read_text()) == \
        json.loads((tmp_path / "whole" / "final_gammas.json").read_text())
    # the γ the run started from survive the kill: the resumed run measures its change from the same start
    assert json.loads((tmp_path / "killed" / "initial_gammas.json").read_text()) == \
        json.loads((tmp_path / "whole" / "initial_gammas.json").read_text())
    assert got["gamma_change"] == expected["gamma_change"] and got["gamma_change"]["mean"] > 0
    assert [m["val_loss"] for m in resumed_metrics] == [m["val_loss"] for m in whole_metrics]


def test_bn_only_training_changes_only_norm_parameters(tiny_data, tmp_path):
    for train_classifier in (True, False):
        config = tiny_config(tiny_data, tmp_path, norm_layer="bn_uniform", epochs=1, bn_only=True,
                             train_classifier=train_classifier, precise_bn_batches=0)
        run_dir = tmp_path / f"run{train_classifier}"
        run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
        from safetensors.torch import load_file

        trained = load_file(run_dir / "best_model.safetensors")
        initial = build_model(config, 3)
        norm_modules = {n for n, m in initial.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        for key, value in initial.state_dict().items():
            owner = key.rpartition(".")[0]
            changed = not torch.equal(trained[key], value)
            if owner in norm_modules and key.endswith(("weight", "bias", "running_mean")):
                assert changed, f"{key} did not train"
            elif owner == "fc":
                assert changed == train_classifier, key
            elif key.endswith(("weight", "bias")):
                assert not changed, f"{key} changed although frozen"


def test_class_subset_preload_and_gamma_init(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, norm_layer="bn_gamma1", gamma_init=0.731, gamma_lr_div=1.0,
                         classes=[2, 0], epochs=1, augmentation="none")
    model = build_model(config, 2)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.allclose(m.weight, torch.full_like(m.weight, 0.731)) for m in layers)
    finals = []
    for preload in (False, True):
        run_dir = tmp_path / f"run{preload}"
        finals.append(run_finetune(replace(config, preload=preload), run_dir, quiet=True,
                                   data_cache_dir=tmp_path / "cache"))
        assert read_metrics(run_dir)[0]["lr_gamma"] == pytest.approx(read_metrics(run_dir)[0]["lr"])  # c = 1
    assert finals[0]["test_acc_at_best_val"] == finals[1]["test_acc_at_best_val"]  # preload changes nothing
    assert finals[0]["initial_effective_scale"] == pytest.approx(0.731)
    data, _ = load_image_dataset("imagefolder", data_dir=tiny_data / "folder", cache_dir=tmp_path / "cache")
    subset = SeededImageDataset(data["test"], lambda image: image, None, classes=[2, 0])
    originals = data["test"]["label"]
    assert len(subset) == sum(label in (0, 2) for label in originals)
    assert sorted(set(subset.labels)) == [0, 1]
    assert all(originals[i] == (2 if new == 0 else 0) for i, new in zip(subset.indices, subset.labels))
    with pytest.raises(RecipeError, match="gamma_init sets γ0 of a bn_gamma"):
        run_finetune(replace(config, norm_layer="rbn"), tmp_path / "bad", quiet=True)
    with pytest.raises(RunError, match=r"classes \[0, 7\] are not all class indices"):
        run_finetune(replace(config, classes=[0, 7]), tmp_path / "bad2", quiet=True, data_cache_dir=tmp_path / "cache")


def test_unreachable_hub_without_local_weights_is_a_clear_cli_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = finetune_main(["--recipe", "demo", "--set", "pretrained=true", "--set", "model=test_resnet",
                          "--run-dir", str(tmp_path / "run"), "--data-cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "pass a local weights file: pretrained_file=PATH" in capsys.readouterr().err


def test_metrics_reach_tensorboard_and_metrics_jsonl_stays_the_source_of_truth(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tiny_data, tmp_path, log_with="tensorboard")
    run_finetune(config, tmp_path / "tb", quiet=True, data_cache_dir=tmp_path / "cache")
    metrics = read_metrics(tmp_path / "tb")
    events = list((tmp_path / "tb" / "tracking").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "tb").rglob("*"))
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train_loss", "test_acc", "lr/decay", "lr/bn_gamma", "gamma/mean", "gamma/below_0.01"} <= tags
    logged = [(e.step, e.value) for e in scalars.Scalars("train_loss")]
    assert logged == [(m["epoch"], pytest.approx(m["train_loss"], rel=1e-6)) for m in metrics]
    assert [e.value for e in scalars.Scalars("lr/bn_gamma")] == pytest.approx([m["lr_gamma"] for m in metrics])


def test_a_weights_file_loads_into_the_cifar_stem_and_input_bn_architecture(tiny_data, tmp_path):
    # the file of a run with the CIFAR stem and the input BN fine-tunes a run of the same architecture: every
    # tensor but the new classifier loads (the stem's 3×3 weights and the input BN's γ included)
    source = tiny_config(tiny_data, tmp_path, model="resnet18", cifar_stem=True, input_bn=True, epochs=1)
    run_finetune(source, tmp_path / "source", quiet=True, data_cache_dir=tmp_path / "cache")
    weights = tmp_path / "source" / "best_model.safetensors"
    config = tiny_config(tiny_data, tmp_path, model="resnet18", cifar_stem=True, input_bn=True,
                         pretrained_file=str(weights), classes=[0, 1])
    model = build_model(config, num_classes=2)
    report = model.bninit_load_report
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert "model.conv1.weight" in report.loaded and "input_bn.weight" in report.loaded
    assert set(report.initialised) == {"model.fc.weight", "model.fc.bias"}  # 3 classes in the file, 2 here
    state = model.state_dict()
    torch.testing.assert_close(state["model.conv1.weight"], saved["model.conv1.weight"])
    # a file of another architecture loads nothing: refused, never a silent run from scratch
    plain = tiny_config(tiny_data, tmp_path, model="resnet18", pretrained_file=str(weights))
    with pytest.raises(tb.PretrainedLoadError, match="no tensor of .* fits the model"):
        build_model(plain, num_classes=3)


def test_clamping_evaluates_only_new_sets_of_small_gammas(tiny_data, tmp_path, monkeypatch):
    from timm_bninit.experiment import train

    calls = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    final = run_finetune(tiny_config(tiny_data, tmp_path, norm_layer=None, epochs=1), tmp_path / "base", quiet=True,
                         data_cache_dir=tmp_path / "cache")
    # plain BN ends with every |γ| near 1: nothing is clamped, so each entry is the last epoch's test accuracy
    assert [c["fraction"] for c in final["gamma_clamp"]] == [0.0, 0.0, 0.0]
    assert [c["test_acc"] for c in final["gamma_clamp"]] == [final["test_acc_last"]] * 3
    assert len(calls) == 2  # the epoch's validation and test passes, no clamping pass


def test_evaluation_workers_start_before_training(tiny_data, tmp_path):
    from timm_bninit.experiment.distributed import make_accelerator
    from timm_bninit.experiment.train import build_run

    for calibrate in (2, 0):
        config = tiny_config(tiny_data, tmp_path, norm_layer="rbn", num_workers=2, precise_bn_batches=calibrate)
        run = build_run(config, make_accelerator(config), tmp_path / "cache")
        early = [run.eval_loaders["validation"].base_dataloader, run.eval_loaders["test"].base_dataloader]
        (early if calibrate else []).append(run.loaders.calibration)
        for base in early:  # forked in build_run, before any step
            assert base._iterator is not None and len(base._iterator._workers) == 2
            assert all(worker.is_alive() for worker in base._iterator._workers)
        assert run.train_loader.base_dataloader._iterator is None  # forks at its first batch, as before
        if not calibrate:
            assert run.loaders.calibration._iterator is None  # never iterated without precise BN: never started


def test_a_run_with_workers_or_preloading_equals_the_run_without(tiny_data, tmp_path):
    # what lets a resume change num_workers and preload (recipe keys declared changes_result=False)
    config = tiny_config(tiny_data, tmp_path, norm_layer="rbn", augmentation="rrc", epochs=3)  # precise BN on
    variants = {"w0": {"num_workers": 0}, "w2": {"num_workers": 2}, "preload": {"num_workers": 0, "preload": True}}
    results = {name: run_finetune(replace(config, **changes), tmp_path / name, quiet=True,
                                  data_cache_dir=tmp_path / "cache") for name, changes in variants.items()}
    for name in ("w2", "preload"):
        for key in ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last"):
            assert results["w0"][key] == results[name][key], (name, key)
    losses = {name: [m["train_loss"] for m in read_metrics(tmp_path / name)] for name in variants}
    assert len(losses["w0"]) == 3 and losses["w0"] == losses["w2"] == losses["preload"]


def test_channels_last_trains_nhwc_weights_saves_plain_tensors_and_changes_only_rounding(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from timm_bninit.experiment.distributed import make_accelerator
    from timm_bninit.experiment.train import build_run

    config = tiny_config(tiny_data, tmp_path, norm_layer="rbn", epochs=1, precise_bn_batches=0)
    steps = {}
    for channels_last in (True, False):
        run = build_run(replace(config, channels_last=channels_last), make_accelerator(config), tmp_path / "cache")
        weight = run.unwrapped.layer1[0].conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert weight.is_contiguous() is not channels_last
        images, labels = next(iter(run.train_loader))  # the same first batch (same seed) in both layouts
        inputs = run.normalize(images)  # the workers' uint8, laid out and normalised on the device
        assert images.dtype == torch.uint8 and inputs.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        loss = run.criterion(run.model(inputs), labels)
        loss.backward()
        steps[channels_last] = loss.item(), [p.grad.clone() for p in run.unwrapped.parameters()]
    assert steps[True][0] == pytest.approx(steps[False][0], rel=1e-6)
    for nhwc, nchw in zip(steps[True][1], steps[False][1]):  # the same step, summed in another order
        assert (nhwc - nchw).norm() <= 1e-4 * nchw.norm() + 1e-7
    run_finetune(config, tmp_path / "run", quiet=True, data_cache_dir=tmp_path / "cache")
    saved = load_file(str(tmp_path / "run" / "best_model.safetensors"))
    assert all(tensor.is_contiguous() for tensor in saved.values())  # a plain state dict, as timm writes it
    timm.create_model("test_resnet", norm_layer="rbn", num_classes=3).load_state_dict(saved)


def test_losses_per_epoch_equal_a_recomputation_on_the_saved_model(tiny_data, tmp_path):
    """metrics.jsonl's val_loss and test_loss at the best-validation epoch are the mean cross-entropy of the saved
    best model (its weights and re-estimated BN statistics) over each split, recomputed here batch by batch."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from timm_bninit.experiment import layout
    from timm_bninit.experiment.distributed import make_accelerator
    from timm_bninit.experiment.train import build_run, laid_out

    config = tiny_config(tiny_data, tmp_path, norm_layer="bn_gamma01", epochs=3, label_smoothing=0.1)
    run_dir = tmp_path / "run"
    final = run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    metrics = read_metrics(run_dir)
    assert all(set(record) == set(layout.METRICS_KEYS) for record in metrics)
    best = metrics[final["best_epoch"] - 1]
    run = build_run(config, make_accelerator(config), tmp_path / "cache")
    loaders = run.loaders
    model = laid_out(config, build_model(config, 3))  # the run's layout, so the convolutions round alike
    model.load_state_dict(load_file(run_dir / "best_model.safetensors"))
    model.eval()
    for split, loader in (("val", loaders.validation), ("test", loaders.test)):
        losses, correct = [], 0
        with torch.no_grad():
            for images, labels in loader:
                logits = model(run.normalize(images))  # the workers hand over uint8; the run normalises on the device
                # plain cross-entropy (the recipe's label smoothing trains, it is not the reported loss), float64
                losses += F.cross_entropy(logits.double(), labels, reduction="none").tolist()
                correct += int((logits.argmax(-1) == labels).sum())
        assert best[f"{split}_acc"] == pytest.approx(100.0 * correct / len(losses), abs=1e-12)
        # the run takes float32 log-softmax per image (relative rounding ~1e-7) and sums in float64: 1e-6 covers it
        assert best[f"{split}_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert metrics[-1]["test_loss"] > 0 and metrics[-1]["val_loss"] > 0


def test_gamma_change_is_recorded_from_the_initial_and_final_gammas(tiny_data, tmp_path):
    from timm_bninit.experiment import layout

    config = tiny_config(tiny_data, tmp_path, norm_layer="bn_gamma01", gamma_lr_div=1, input_bn=True)
    run_dir = tmp_path / "run"
    final = run_finetune(config, run_dir, quiet=True, data_cache_dir=tmp_path / "cache")
    initial = json.loads((run_dir / layout.INITIAL_GAMMAS_FILE).read_text())
    last = json.loads((run_dir / layout.GAMMAS_FILE).read_text())
    # the file holds the γ of the model the seed builds, before any update: 0.1 everywhere, 0.58 × 0.1 for the input
    fresh = {name: m.weight.tolist() for name, m in build_model(config, 3).named_modules()
             if isinstance(m, torch.nn.BatchNorm2d)}
    assert initial == fresh and initial.keys() == last.keys()
    assert initial["input_bn"] == pytest.approx([0.058] * 3, abs=1e-8)  # the input BN counts: 0.58 × 0.1 in float32
    assert {v for name, values in initial.items() if name != "input_bn" for v in values} == {float(np.float32(0.1))}
    moved = np.abs(np.concatenate([np.subtract(last[k], initial[k]) for k in initial]))
    change = final["gamma_change"]
    assert change["channels"] == moved.size and change["layers"] == len(initial)
    assert change["mean"] == pytest.approx(moved.mean(), rel=1e-12) and change["max"] == moved.max()
    assert change["initial_mean"] == pytest.approx(np.mean(np.abs(np.concatenate(list(initial.values())))), rel=1e-12)
    assert change["mean"] > 1e-4  # γ at the base rate for two epochs does move
    assert json.loads((run_dir / "final.json").read_text())["gamma_change"] == change


def test_the_initial_gammas_are_written_once(tmp_path):
    from timm_bninit.experiment import layout

    layout.write_initial_gammas(tmp_path, {"bn1": [0.1, 0.1]})
    layout.write_initial_gammas(tmp_path, {"bn1": [0.5, 0.5]})  # a restart rebuilds the same model: keep the first
    assert layout.read_initial_gammas(tmp_path) == {"bn1": [0.1, 0.1]}
    assert layout.read_initial_gammas(tmp_path / "elsewhere") is None


def test_the_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        finetune_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "3 the run diverged" in text and "130 or 143 stopped by Ctrl-C (SIGINT) or SIGTERM" in text


def _tiny_recipe(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    return path


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_non_finite_loss_with_exit_code_3(tiny_data, tmp_path, capsys):
    # the issue's `--set lr=50` on the demo recipe, on the tiny data set: a learning rate at which the loss is NaN
    # within the first epoch (4 steps of 6 images here)
    recipe = _tiny_recipe(tmp_path / "tiny.yaml", tiny_config(tiny_data, tmp_path, epochs=2))
    run_dir = tmp_path / "run"
    code = finetune_main(["--recipe", str(recipe), "--set", "lr=100000", "--run-dir", str(run_dir),
                          "--data-cache-dir", str(tmp_path / "cache"), "--quiet"])
    final = json.loads((run_dir / "final.json").read_text())
    where = final["divergence"]
    assert code == 3 and final["status"] == "diverged"
    # step 1 runs on the initial weights (loss ≈ ln 3); the buffer is read at the end of the 4-step epoch
    assert where["epoch"] == 1 and 2 <= where["step"] <= final["num_updates"] == 4
    assert where["loss"] in ("nan", "inf", "-inf") and where["epochs_completed"] == 0 and where["before"] is None
    err = capsys.readouterr().err.splitlines()  # (the data set's first build draws progress bars there too)
    assert [line for line in err if "diverged" in line] == [
        f"{run_dir}: diverged in epoch 1 at step {where['step']} (training loss {where['loss']}), so it stopped there; "
        f"final.json records it with every accuracy at chance level (33.33%). Try a lower lr or a warm-up"]
    # the rule of docs/guide/comparisons.md: chance level, 100/k for k = 3 classes, at every endpoint
    for key in ("test_acc_at_best_val", "test_acc_last", "best_val_acc", "val_acc_last"):
        assert final[key] == 100 / 3, key
    assert final["best_epoch"] is None and final["gamma_clamp"] == []
    # no epoch finished: what a run writes when it starts, and its result
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "final.json", "initial_gammas.json",
                                                        "model_info.json"]
    # finished: never trained again; --resume returns it, with the same exit code
    assert finetune_main(["--recipe", str(recipe), "--set", "lr=100000", "--run-dir", str(run_dir), "--resume",
                          "--quiet"]) == 3
    assert json.loads((run_dir / "final.json").read_text()) == final


@pytest.mark.slow
def test_ctrl_c_stops_a_run_at_a_step_boundary_and_the_printed_command_resumes_it(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, norm_layer="rbn", epochs=5, augmentation="rrc", drop_rate=0.2)
    recipe = _tiny_recipe(tmp_path / "tiny.yaml", config)
    cache = tmp_path / "cache"
    whole = _launch(recipe, tmp_path / "whole", cache)
    assert whole.wait(timeout=300) == 0, _log(tmp_path / "whole")

    stopped = _launch(recipe, tmp_path / "stopped", cache)
    state = tmp_path / "stopped" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.02)
    stopped.send_signal(signal.SIGINT)  # Ctrl-C, once
    assert stopped.wait(timeout=120) == 130, _log(tmp_path / "stopped")
    saved = json.loads(state.read_text())["state"]["epoch"]
    assert 1 <= saved < 5 and not (tmp_path / "stopped" / "final.json").exists()
    assert [m["epoch"] for m in read_metrics(tmp_path / "stopped")] == list(range(1, saved + 1))
    lines = _log(tmp_path / "stopped").strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    line = lines[0]
    assert line.startswith(f"{tmp_path / 'stopped'}: interrupted by SIGINT ")
    assert f"its checkpoint after epoch {saved} is intact; resume with: python " in line

    command = shlex.split(line.split("resume with: ")[1])
    assert command[-1] == "--resume" and command[1] == str(ROOT / "scripts" / "finetune.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    resumed = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    expected = json.loads((tmp_path / "whole" / "final.json").read_text())
    got = json.loads((tmp_path / "stopped" / "final.json").read_text())
    for key in ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last", "num_updates",
                "status"):
        assert got[key] == expected[key], key
    assert [m["train_loss"] for m in read_metrics(tmp_path / "stopped")] == \
        [m["train_loss"] for m in read_metrics(tmp_path / "whole")]


def test_the_training_loop_reads_the_device_once_per_epoch_or_log_interval(tiny_data, tmp_path, monkeypatch):
    from timm_bninit.experiment import train
    from timm_bninit.experiment.distributed import make_accelerator

    config = tiny_config(tiny_data, tmp_path, epochs=1)
    run = train.build_run(config, make_accelerator(config), tmp_path / "cache")
    # every way a tensor's value reaches the host, each of which waits for the device's queued work; the DataLoader's
    # own seed draw is left out: its tensor is on the CPU whatever the device
    reads = []

    def counting(name: str):
        read = getattr(torch.Tensor, name)

        def counted(self):
            if not any("torch/utils/data" in frame.filename for frame in traceback.extract_stack(limit=4)):
                reads.append(name)
            return read(self)
        return counted

    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    state = {"num_updates": 0, "train_seconds": 0.0, "train_images": 0}
    steps = len(run.train_loader)
    assert steps == 4  # 27 training images, batches of 6
    train.train_one_epoch(run, 0, state, show=False)
    # the divergence and stop check of the epoch's last steps (every 8 steps and at the epoch's end: once here), then
    # the epoch's loss
    assert reads == ["tolist", "__float__"]
    reads.clear()
    monkeypatch.setattr(train, "LOG_INTERVAL", 2)
    train.train_one_epoch(run, 1, state, show=True)
    assert reads == ["__float__"] * (steps // 2) + ["tolist", "__float__"]  # the bar every 2 steps, then as above
    reads.clear()
    train.evaluate(run.evaluated, run.eval_loaders["test"], run.accelerator, run.normalize)
    assert reads == ["tolist"]  # the correct predictions and the loss sum, kept on the device, read once together
