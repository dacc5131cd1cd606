"""``compile: true``: a run through ``torch.compile`` trains, evaluates, saves and resumes as the eager run does.

The layers' own compiled forward and backward are checked in float64 in test_compile.py; here the wiring of a run:
the compiled model is the one the optimizer steps, evaluation goes through its own compiled module, what is saved
(accelerate's checkpoint, ``best_model.safetensors``) keeps the plain state-dict keys, a compiled run resumes, and a
calibrated variant compiles without graph breaks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import tiny_config
from PIL import Image
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from timm_bninit.experiment import train
from timm_bninit.experiment.distributed import make_accelerator
from timm_bninit.experiment.recipe import COMPILE_MODES, RecipeError, check_config
from timm_bninit.experiment.train import build_run, run_finetune

IMAGE_SIZE, BATCH = 32, 24


def make_textured_imagefolder(root: Path, train: int = 12, test: int = 4) -> Path:
    """3 classes of smooth random fields plus grain, each tinted by its class, as JPEGs; returns the data folder.

    Why not the solid colours of ``fake_datasets``: on flat images every plane of a norm layer has almost no
    variance, and a run's result then hangs on last-bit differences (a weight moved by 1e-6 changed the second
    epoch's loss by 20-40 %), so no run could be compared at float32 tolerance. No pixel saturates (no ties for
    max-pooling to break by rounding)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for label in range(3):
            for index in range(count):
                field = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
                field = np.asarray(field.resize((48, 48), Image.Resampling.BICUBIC), dtype=np.float32)
                pixels = 0.5 * field + 20 + 60 * np.eye(3)[label] + rng.normal(0, 5, field.shape)  # within 0..255
                path = root / "folder" / split / f"class{label}" / f"{index:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def textured_data(tmp_path_factory):
    return make_textured_imagefolder(tmp_path_factory.mktemp("textured"))


def compile_config(data_root: Path, tmp_path: Path, **changes):
    """RBN (a calibrated layer: its kernels take their portable path when compiled), 32 px, one step an epoch (24
    training images; 12 validation and 12 test images, one evaluation shape).

    One step an epoch because a training step amplifies a difference of the weights: a 1e-6 relative change of every
    initial weight moved the second step's loss by 3e-5-9e-5 and the third's by 3e-3-2e-2 (measured, plain BN and
    RBN alike, lr 0.01-0.1), so over more steps two float32 runs differ by more than rounding, whatever computes them.
    """
    return tiny_config(data_root, tmp_path, norm_layer="rbn", img_size=IMAGE_SIZE, batch_size=BATCH,
                       val_fraction=1 / 3, **changes)


def test_compile_mode_without_compile_is_refused_and_modes_are_torchs(tiny_data, tmp_path):
    with pytest.raises(RecipeError, match="compile_mode.*'max-autotune'.*compile is false; set compile=true"):
        check_config(tiny_config(tiny_data, tmp_path, compile_mode="max-autotune"))
    check_config(tiny_config(tiny_data, tmp_path, compile=True, compile_mode="max-autotune"))
    assert set(COMPILE_MODES) <= set(torch._inductor.list_mode_options())


@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_a_compiled_run_steps_the_compiled_model_and_evaluates_through_its_own(tiny_data, tmp_path, ema):
    # nothing is compiled here: torch.compile compiles at the first call
    config = tiny_config(tiny_data, tmp_path, norm_layer="rbn", ema=ema)
    eager = build_run(config, make_accelerator(config), tmp_path / "cache")
    compiled_config = dataclasses.replace(config, compile=True)
    run = build_run(compiled_config, make_accelerator(compiled_config), tmp_path / "cache")
    optimized = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(run.model, optimized) and run.model._orig_mod is run.unwrapped
    assert not isinstance(run.unwrapped, optimized)
    assert list(run.unwrapped.state_dict()) == list(eager.unwrapped.state_dict())  # no `_orig_mod.` prefix
    assert run.accelerator._models == [run.unwrapped]  # what accelerate's checkpoints save and load
    stepped = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in run.unwrapped.parameters()}
    assert isinstance(run.evaluator, optimized) and run.evaluator._orig_mod is run.evaluated
    assert (run.evaluated is run.ema.module) if ema else (run.evaluated is run.unwrapped)
    assert eager.evaluator is eager.evaluated  # eager: evaluation as before


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


ACCURACIES = ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last")
EVALUATE = train.evaluate


def probable_rounding(dtype: torch.dtype, terms: int, layers: int, confidence: float = 8.0) -> float:
    """How far two evaluations of the same float computation in other summation orders drift apart, relative to the
    magnitudes summed: Higham & Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4), which
    holds whatever the CPU or the order: with rounding errors independent and of mean zero, a sum of n terms is off
    by at most λ·√n·u·Σ|terms| (u = eps / 2) with probability ≥ 1 − 2n·exp(−λ²/2) (1 − 1e-10 at λ = 8 and n = 6144);
    every layer in sequence adds its own. The worst-case n·u (tests/test_compile.py) is ~80× looser here and would
    leave every prediction near a tie."""
    return layers * confidence * math.sqrt(terms) * torch.finfo(dtype).eps / 2


def recording_evaluations(monkeypatch) -> list[torch.Tensor]:
    """Make every evaluation of a run also record its logits (one more pass of the same module, outside the count)."""
    logits: list[torch.Tensor] = []

    def recording(model, loader, accelerator, normalize=None):
        model.eval()
        with torch.no_grad():
            logits.append(torch.cat([model(images if normalize is None else normalize(images)).float()
                                     for images, _ in loader]))
        return EVALUATE(model, loader, accelerator, normalize)

    monkeypatch.setattr(train, "evaluate", recording)
    return logits


def assert_same_predictions(compiled: list[torch.Tensor], eager: list[torch.Tensor], tolerance: float) -> bool:
    """Every evaluation's logits equal to ``tolerance`` relative to the largest; returns whether every prediction is
    decided by a margin above that (then, and only then, no accuracy may differ)."""
    assert len(compiled) == len(eager) > 0
    decided = True
    for index, (got, want) in enumerate(zip(compiled, eager)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * scale, msg=f"evaluation {index}")
        top2 = want.topk(2, dim=1).values
        decided &= bool((top2[:, 0] - top2[:, 1] > 2 * tolerance * scale).all())
    return decided


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_run_saves_plain_keys_and_resumes(textured_data, tmp_path, monkeypatch):
    # inductor builds C++ kernels for the training and the evaluation graph: minutes on 2 shared cores, cold
    config, cache = compile_config(textured_data, tmp_path), tmp_path / "cache"
    eager_logits = recording_evaluations(monkeypatch)
    eager = run_finetune(config, tmp_path / "eager", quiet=True, data_cache_dir=cache)
    compiled_logits = recording_evaluations(monkeypatch)
    counters.clear()
    compiled_config = dataclasses.replace(config, compile=True)
    compiled = run_finetune(compiled_config, tmp_path / "compiled", quiet=True, data_cache_dir=cache)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # whole graphs, RBN included

    # The same float32 formulas, fused and summed in other orders (probable_rounding: ≈ 1e-3 here). The second
    # epoch's loss and logits come after one update, which can amplify the first step's difference ~100×
    # (compile_config): a first step off by 1e-5 would still pass, a compiled model that trains or evaluates other
    # weights would not.
    norm_layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in train.build_model(config, 3).modules())
    tolerance = probable_rounding(torch.float32, terms=BATCH * (IMAGE_SIZE // 2) ** 2, layers=norm_layers)
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=tolerance)
    if assert_same_predictions(compiled_logits, eager_logits, tolerance):
        for key in ACCURACIES:
            assert compiled[key] == eager[key], key
    keys = list(load_file(tmp_path / "eager" / "best_model.safetensors"))
    assert list(load_file(tmp_path / "compiled" / "best_model.safetensors")) == keys

    # killed after epoch 1's checkpoint, then resumed compiled: the same run as the uninterrupted one
    original = train.train_one_epoch

    def interrupt_in_epoch_2(run, epoch, *args):
        if epoch == 1:
            saved = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
            assert sorted(saved) == sorted(keys)  # accelerate's checkpoint: plain keys too
            raise _Interrupted
        return original(run, epoch, *args)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_in_epoch_2)
    with pytest.raises(_Interrupted):
        run_finetune(compiled_config, tmp_path / "resumed", quiet=True, data_cache_dir=cache)
    monkeypatch.setattr(train, "train_one_epoch", original)
    resumed = run_finetune(compiled_config, tmp_path / "resumed", resume=True, quiet=True, data_cache_dir=cache)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "compiled")
    for key in ACCURACIES:
        assert resumed[key] == compiled[key], key
