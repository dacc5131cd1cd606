"""Recipes: YAML files of hyper-parameters, every key overridable from the command line, unknown keys refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import yaml

from ..convert import BN_TRANSFER_POLICIES
from ..errors import BNInitError, did_you_mean
from ..norm import BatchNormGamma2d
from ..registry import resolve_norm_layer

__all__ = ["DEFAULTS", "RecipeError", "check_config", "recipe_dir", "list_recipes", "load_recipe", "apply_overrides"]

# Every key a recipe may set, with its default. A recipe file sets a subset; `--set key=value` overrides any.
DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits",          # cub | cars | digits | imagefolder | cifar10 | cifar100, or a folder
    "data_dir": None,             # local copy (official archive layout or imagefolder); None: the hub copy
    "classes": None,              # keep only these class indices (relabelled 0..k-1 in this order); None: all
    "preload": False,             # decode every image once per process and keep it in memory (small data sets)
    "val_fraction": 0.1,          # stratified fraction of train held out for model selection
    "split_seed": 0,              # seed of that split: fixed, never the run seed
    "skip_corrupt": False,        # skip unreadable images (counted in final.json) instead of failing
    "num_workers": 2,
    # model
    "model": "resnet18",
    "pretrained": False,          # True: the model's timm hub weights; a string: a hub tag; False: from scratch
    "pretrained_file": None,      # local weights file used instead of the hub
    "norm_layer": None,           # None: plain BN (BASE); or a timm-bninit name such as bn_gamma01
    "bn_transfer": "keep",        # what a pretrained γ becomes: keep | reset | scale
    "gamma_init": None,           # γ0 of a bn_gamma* layer other than its name's (e.g. 0.731, RBN's initial scale)
    "gamma_lr_div": None,         # γ learning-rate divisor c for every BN; None: the variant's own (plain BN: 1)
    "zero_init_last": False,      # keep timm ResNets' zeroed last-BN γ (False: every BN starts at its γ0, BASE at 1)
    "cifar_stem": False,          # 3×3 stride-1 stem without max-pool (the paper's CIFAR ResNets)
    "bn_only": False,             # train only BN γ/β (Frankle et al.); running statistics still update
    "train_classifier": True,     # with bn_only: keep the output layer trainable
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    # optimisation
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,         # conv/linear weights only
    "sched": "cosine",            # any timm scheduler name
    "step_on_epochs": False,      # step the schedule once per epoch (the paper) instead of every update
    "warmup_epochs": 0,
    "warmup_lr": 1e-5,
    "min_lr": 0.0,
    "epochs": 10,
    "batch_size": 64,
    "grad_accum_steps": 1,
    "label_smoothing": 0.0,
    "ema": False,                 # evaluate an exponential moving average of the weights
    "ema_decay": 0.9998,
    "mixed_precision": "no",      # no | fp16 | bf16
    # images
    "img_size": 224,
    "augmentation": "rrc",        # rrc: timm's random-resized-crop + flip | flip: flip only | none
    # evaluation
    "precise_bn_batches": 0,      # re-estimate BN statistics on this many train batches before each evaluation
    "seed": 1,
}


class RecipeError(BNInitError, ValueError):
    """A recipe or override that cannot be used; the message names the valid choices."""


def recipe_dir() -> Path:
    """The ``recipes/`` folder: ``$TIMM_BNINIT_RECIPES``, else the repository's (editable install), else ./recipes."""
    if os.environ.get("TIMM_BNINIT_RECIPES"):
        return Path(os.environ["TIMM_BNINIT_RECIPES"])
    repository = Path(__file__).resolve().parent.parent / "recipes"
    return repository if repository.is_dir() else Path.cwd() / "recipes"


def list_recipes() -> list[str]:
    folder = recipe_dir()
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def _unknown_key(key: str) -> RecipeError:
    hint = did_you_mean(key, list(DEFAULTS))
    return RecipeError(f"unknown recipe key {key!r}. {hint} Valid keys: {', '.join(sorted(DEFAULTS))}")


def _coerce(key: str, value: Any) -> Any:
    """Give a value the type of the key's default (YAML reads '1e-4' as a string, for one)."""
    default = DEFAULTS[key]
    if key == "pretrained" and isinstance(value, str) and value.lower() not in ("true", "false", "yes", "no"):
        return value  # a hub tag such as resnet50.tv_in1k
    if value is None or default is None or isinstance(value, type(default)):
        if isinstance(value, str) and default is None:
            return _number_or_text(value)
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise RecipeError(f"recipe key {key!r} expects a {type(default).__name__} (like {default!r}), got {value!r}")


def _number_or_text(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The defaults updated with a recipe file, given by name (``cub``) or path; ``recipe`` records its source."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r} (no file {path}); available: "
                          f"{', '.join(list_recipes()) or '(none found)'}, or pass a path to a .yaml file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, got {type(loaded).__name__}")
    config = dict(DEFAULTS)
    for key, value in loaded.items():
        if key not in DEFAULTS:
            raise RecipeError(f"in {path}: {_unknown_key(key)}")
        config[key] = _coerce(key, value)
    try:
        config["recipe"] = str(path.resolve().relative_to(recipe_dir().resolve()).with_suffix(""))
    except ValueError:  # a recipe file outside recipes/
        config["recipe"] = str(path)
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML, then given the key's type)."""
    config = dict(config)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. --set lr=0.01)")
        if key not in DEFAULTS:
            raise _unknown_key(key)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        config[key] = _coerce(key, value)
    return config


def check_config(config: dict[str, Any]) -> None:
    """Refuse, before any work, what cannot run: unknown model, norm layer or policy; bad numbers."""
    if not timm.is_model(config["model"]):
        hint = did_you_mean(config["model"], timm.list_models())
        raise RecipeError(f"unknown timm model {config['model']!r}. {hint} See timm.list_models().")
    if config["norm_layer"] is not None:
        norm = resolve_norm_layer(config["norm_layer"])[0]
    if config["gamma_init"] is not None:
        base = getattr(norm, "func", norm) if config["norm_layer"] is not None else None
        if not (isinstance(base, type) and issubclass(base, BatchNormGamma2d)):
            raise RecipeError(f"gamma_init sets γ0 of a bn_gamma* layer, but norm_layer is {config['norm_layer']!r}; "
                              f"use e.g. norm_layer=bn_gamma1 gamma_init=0.731")
    if config["classes"] is not None and (not isinstance(config["classes"], list) or len(config["classes"]) < 2
                                          or len(set(config["classes"])) != len(config["classes"])):
        raise RecipeError(f"classes must be a list of at least 2 distinct class indices, got {config['classes']!r}")
    if config["bn_transfer"] not in BN_TRANSFER_POLICIES:
        raise RecipeError(f"bn_transfer must be one of {', '.join(BN_TRANSFER_POLICIES)}, got "
                          f"{config['bn_transfer']!r}")
    for key in ("epochs", "batch_size", "grad_accum_steps", "img_size"):
        if config[key] < 1:
            raise RecipeError(f"{key} must be ≥ 1, got {config[key]}")
    if not 0 <= config["val_fraction"] < 1:
        raise RecipeError(f"val_fraction must be in [0, 1), got {config['val_fraction']}")
    if config["augmentation"] not in ("rrc", "flip", "none"):
        raise RecipeError(f"augmentation must be rrc, flip or none, got {config['augmentation']!r}")
    if config["pretrained_file"] is not None and not Path(config["pretrained_file"]).is_file():
        raise RecipeError(f"pretrained_file {config['pretrained_file']!r} does not exist; pass the path of a "
                          f".safetensors/.pth/.bin weights file")
    if config["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise RecipeError(f"mixed_precision must be no, fp16 or bf16, got {config['mixed_precision']!r}")
