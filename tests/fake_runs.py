"""Helpers for the tests of trained models: outputs recorded *during* a run, and finished run directories made without
training (for the variant matrix, where the run itself is not what is tested)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from timm_bninit.experiment import layout, train
from timm_bninit.experiment.loaders import eval_data_config
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.trained import OUTPUT_RTOL

CLASS_NAMES = ["cat", "dog", "fox"]


def fixed_pixels(size: int, count: int = 4) -> torch.Tensor:
    """The same [0, 1] images every time: what the tests feed the run's model and the loaded one."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(123))


@contextlib.contextmanager
def recorded_evaluations(pixels: torch.Tensor) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Within the block, every run's evaluation (``train.validate``) also records, per epoch, the outputs on
    ``pixels`` of the model the run evaluated (``run.evaluated``: the EMA with one) and of its trained weights
    (``run.unwrapped``), right after that epoch's evaluation: the reference the loaded model is held to."""
    recorded: list[dict[str, torch.Tensor]] = []
    validate = train.validate

    def recording(run: train.Run) -> dict[str, float]:
        accuracy = validate(run)
        with torch.no_grad():  # an eval-mode forward changes no state; the next epoch sets train mode again
            recorded.append({"evaluated": run.evaluated.eval()(pixels).clone(),
                             "weights": run.unwrapped.eval()(pixels).clone()})
        return accuracy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "validate", recording)
        yield recorded


def assert_same_outputs(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 reduction order: OUTPUT_RTOL of the largest logit (derived in trained.py)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0.0, atol=OUTPUT_RTOL * scale)


def assert_other_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two models the tests must tell apart differ by far more than the tolerance of :func:`assert_same_outputs`."""
    assert float((a - b).abs().max()) > 100 * OUTPUT_RTOL * float(b.abs().max())


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Give every norm tensor a value of its own (as training would): γ scaled in [0.5, 1.5] (positive), β and the
    running mean N(0, 0.1), running variance in [0.5, 2], a variant's extra tensors moved by N(0, 0.5), so that a
    loaded model that dropped or mixed up any of them computes something else."""
    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype)

    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        if isinstance(module.weight, nn.Parameter):
            module.weight.mul_(torch.rand(module.weight.shape, generator=generator) + 0.5)
        if module.bias is not None:
            module.bias.copy_(0.1 * draw(module.bias))
        module.running_mean.copy_(0.1 * draw(module.running_mean))
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 1.5 + 0.5)
        for name in getattr(module, "extra_tensor_names", ()):
            getattr(module, name).add_(0.5 * draw(getattr(module, name)))


def fake_finished_run(run_dir: Path, config: Any, *, seed: int = 0, final: dict[str, Any] | None = None
                      ) -> nn.Module:
    """A finished run directory of ``config`` without training: its model built as a run builds it, every norm tensor
    perturbed, saved as the best and the last epoch's weights; returns that model (eval mode)."""
    model = build_model(config, len(CLASS_NAMES))
    perturb(model, seed)
    run_dir.mkdir(parents=True)
    layout.write_config(run_dir, config)
    layout.write_model_info(run_dir, CLASS_NAMES, eval_data_config(config, model))
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    for name in (layout.BEST_MODEL_FILE, layout.LAST_MODEL_FILE):
        save_file(state, str(run_dir / name))
    layout.write_final(run_dir, {"test_acc_at_best_val": 50.0, "best_epoch": 1, "best_val_acc": 40.0,
                                 "test_acc_last": 45.0, "val_acc_last": 35.0, "selection": "validation",
                                 "epochs": config.epochs, "seed": config.seed,
                                 "data": {"name": "imagefolder", "origin": "local", "source": "/data/folder",
                                          "split_sizes": {"train": 27, "validation": 9, "test": 12}},
                                 "environment": {"timm": "1", "torch": "2", "num_processes": 1}, **(final or {})})
    return model.eval()
