"""The trained model of a finished run, back in one call: :func:`load_run`.

A run directory keeps the evaluated weights of its best-validation and last epochs, its resolved recipe and
``model_info.json`` (class names, the evaluation's preprocessing). :func:`load_run` rebuilds the architecture the run
trained through the run's own ``build_model`` (variant, CIFAR stem, the official protocol's input BN), loads the
weights strictly and returns the model in eval mode, laid out in memory as the run evaluated it, with timm's
``pretrained_cfg`` describing its inputs and outputs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import BNInitValueError
from . import layout
from .layout import RunError
from .model import build_model
from .recipe import Recipe, import_user_modules, recipe_from_mapping
from .train import laid_out

__all__ = ["OUTPUT_RTOL", "WEIGHTS", "load_run", "read_run_config", "weight_problems", "trained_cfg"]

# Outputs of one trained model computed another way (an export loaded by timm, a run evaluated in other processes),
# relative to the largest logit. Both compute one function through other kernels: NCHW instead of channels-last
# convolutions, other thread counts, and with a folded input BN (x − m)/s instead of BN's (x − μ)·γ/σ + β. A float32
# sum of K terms taken in another order moves by ≈ √K·ε (ε = 1.2e-7; K = 4,608 for a 3×3×512 convolution: ≈ 1e-5
# relative), and in eval mode the layers (affine maps, ReLU, the calibrations' sigmoids of plane means) are smooth
# and carry such relative errors forward without amplifying them much. Measured on exports here (test_resnet with
# every kind of variant, resnet18 with the CIFAR stem and the folded input BN, resnet50): 0 to 8e-7 of the largest
# logit. A real difference (another weight, stem, norm
# layer or normalisation) moves the logits by far more: the tests check that each one they must detect is over 100
# times this tolerance.
OUTPUT_RTOL = 1e-4
WEIGHTS = {"best": layout.BEST_MODEL_FILE, "last": layout.LAST_MODEL_FILE}
# what a timm pretrained_cfg keeps of the architecture's own: where its input convolution and classifier are. The
# rest of timm's cfg (source, tag, license, test sizes) describes timm's published weights, not a run's
_STRUCTURAL_CFG_KEYS = ("architecture", "first_conv", "classifier", "fixed_input_size")


def read_run_config(run_dir: str | os.PathLike) -> tuple[Recipe, dict[str, Any], dict[str, Any]]:
    """A finished run's recipe, ``final.json`` and ``model_info.json``; a RunError says what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a run directory (no such folder)")
    final = layout.read_final(run_dir)
    if final is None:
        status = layout.run_status(run_dir)
        raise RunError(f"{run_dir} holds no finished run (status: {status}; {layout.FINAL_FILE} is written when the "
                       f"last epoch is done): finish it with finetune.py --resume --run-dir {run_dir}")
    recorded = layout.read_config(run_dir)
    if recorded is None:
        raise RunError(f"{run_dir} has {layout.FINAL_FILE} but no {layout.CONFIG_FILE}: the recipe that built the "
                       f"model is missing, so the weights cannot be read")
    info = layout.read_model_info(run_dir)
    if info is None:
        raise RunError(f"{run_dir} has no {layout.MODEL_INFO_FILE} (class names, preprocessing): it was written by a "
                       f"timm-bninit that did not keep them; re-run it to use its weights as a model")
    return recipe_from_mapping(recorded, f"in {run_dir / layout.CONFIG_FILE}"), final, info


def _describe(config: Recipe, num_classes: int) -> str:
    parts = [config.model, f"norm_layer={config.norm_layer or 'plain BN'}", f"{num_classes} classes"]
    parts += [name for name in ("cifar_stem", "input_bn") if getattr(config, name)]
    return ", ".join(parts)


def weight_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """How ``state`` differs from ``model``'s own state dict: missing and unexpected keys, other shapes ([] if none).

    Asked before ``load_state_dict``, because a timm-bninit layer fills the extra tensors a plain-BN file lacks (so
    that pretrained BN checkpoints load): loading would succeed with initial values where trained ones belong.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in expected
                if key in state and state[key].shape != expected[key].shape]
    return [f"{len(found)} {kind} (e.g. {', '.join(found[:3])})" for kind, found in
            (("keys missing", missing), ("keys unexpected", unexpected), ("of another shape", reshaped)) if found]


def _weights(run_dir: Path, which: str) -> tuple[Path, dict[str, torch.Tensor]]:
    if which not in WEIGHTS:
        raise BNInitValueError(f"which={which!r}: choose 'best' (the best-validation epoch's weights) or 'last'")
    path = run_dir / WEIGHTS[which]
    if not path.is_file():
        raise RunError(f"{run_dir} has no {WEIGHTS[which]}: the run finished before timm-bninit kept the {which} "
                       f"epoch's weights" + ("; which='best' loads the best-validation epoch's" if which == "last"
                                             else ""))
    try:
        return path, load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise RunError(f"{path} is not a readable safetensors file ({error})") from None


def load_run(run_dir: str | os.PathLike, which: str = "best") -> nn.Module:
    """The trained model of a finished run, in eval mode: the model the run evaluated at that epoch.

    The architecture is rebuilt from the run's ``config.yaml`` as the run built it (without fetching pretrained
    weights: the run's own replace them all), in the run's memory layout, and the weights load strictly. The EMA's
    weights when the run kept an EMA; any process count. A mixed-precision run evaluated under autocast: the model
    comes back in float32 (its outputs differ from the run's by that rounding).

    ``model.pretrained_cfg`` is timm's description of its inputs and outputs: ``label_names`` (the class names in
    output order), and the run's evaluation preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode``), so timm's ``resolve_model_data_config`` + ``create_transform`` rebuild it.

    Example::

        model = timm_bninit.load_run("runs/demo/bn_gamma01-lr0.05-s1-20250101-120000")
        names = model.pretrained_cfg["label_names"]

    Args:
        run_dir: A finished run directory.
        which: ``best`` (the best-validation epoch, the one ``test_acc_at_best_val`` reports) or ``last``.

    Raises:
        RunError: The run is not finished, a file is missing, or the weights do not fit its recipe.
    """
    run_dir = Path(run_dir)
    config, _, info = read_run_config(run_dir)
    path, state = _weights(run_dir, which)
    import_user_modules(config.imports)  # a variant or model of the user's own, registered by their module
    names = list(info["class_names"])
    model = build_model(replace(config, pretrained=False, pretrained_file=None), len(names))
    problems = weight_problems(model, state)
    if problems:
        raise RunError(f"{path} does not fit the model its {layout.CONFIG_FILE} builds ({_describe(config, len(names))}"
                       f"): {'; '.join(problems)}. The weights and the recipe come from different runs; use the run "
                       f"directory as training wrote it")
    model.load_state_dict(state)
    model = laid_out(config, model).eval()
    model.pretrained_cfg = trained_cfg(model.pretrained_cfg, info)
    return model


def trained_cfg(architecture_cfg: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for a run's weights: the architecture's structural keys, the run's preprocessing
    and its classes (``num_classes``, ``label_names``)."""
    data = {key: tuple(value) if isinstance(value, list) else value for key, value in info["data_config"].items()}
    kept = {key: architecture_cfg[key] for key in _STRUCTURAL_CFG_KEYS if key in architecture_cfg}
    return {**kept, **data, "num_classes": len(info["class_names"]), "label_names": list(info["class_names"])}
