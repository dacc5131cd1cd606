"""Recipes: YAML files of hyper-parameters, every key overridable from the command line, unknown keys refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import timm.optim
import yaml
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from ..convert import BN_TRANSFER_POLICIES
from ..data import DatasetError, resolve_source
from ..data.hub import HUB_COPIES
from ..errors import RecipeError, did_you_mean
from ..norm import BatchNormGamma2d
from ..registry import UnknownNormLayerError, resolve_norm_layer
from .loaders import resize_crop_size

__all__ = ["DEFAULTS", "SCHEMA", "OFFICIAL_PROTOCOL", "RecipeError", "check_config", "recipe_dir", "list_recipes",
           "load_recipe", "apply_overrides"]

# Every key a recipe may set, with its default. A recipe file sets a subset; `--set key=value` overrides any.
DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits",          # cub | cars | digits | imagefolder | cifar10 | cifar100, or a folder
    "data_dir": None,             # local copy (official archive layout or imagefolder); None: the hub copy
    "hub_revision": None,         # hub commit, branch or tag of the CUB/Cars hub copy; None: the pinned commit
    "classes": None,              # keep only these class indices (relabelled 0..k-1 in this order); None: all
    "preload": False,             # decode every image once per process and keep it in memory (small data sets)
    "val_fraction": 0.1,          # stratified fraction of train held out for model selection
    "split_seed": 0,              # seed of that split: fixed, never the run seed
    "skip_corrupt": False,        # skip unreadable images (counted in final.json) instead of failing
    "train_per_class": None,      # keep the first k train images of each class (order drawn with split_seed), after
                                  # the validation split, which stays as it is; None: all
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
    "input_bn": False,            # a BN (γ = 0.58·γ0, β frozen at 0) in front of the network on [0, 1] pixels instead
                                  # of mean/std normalisation (the official code's input normalisation)
    # optimisation
    "protocol": "timm",           # timm | official: pin the keys of OFFICIAL_PROTOCOL (Davis & Frank's code,
                                  # docs/methods.md §1) and use its init (fan_in convs, zero biases, γ0 on every BN)
    "optimizer": "sgd",
    "fused_optimizer": True,      # torch's fused kernel for torch's optimizers (sgd, momentum, adam, adamw): the same
                                  # update, faster; it rounds differently from the per-tensor loop in the last bit
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,         # conv/linear weights only
    "sched": "cosine",            # any timm scheduler name
    "step_on_epochs": False,      # step the schedule once per epoch (the paper) instead of every update
    "warmup_epochs": 0,
    "warmup_lr": 1e-5,
    "min_lr": 0.0,
    "decay_milestones": None,     # sched multistep: the epochs at which lr is multiplied by decay_rate; None: timm's
    "decay_rate": 0.1,
    "epochs": 10,
    "batch_size": 64,
    "grad_accum_steps": 1,
    "label_smoothing": 0.0,
    "ema": False,                 # evaluate an exponential moving average of the weights
    "ema_decay": 0.9998,
    "mixed_precision": "no",      # no | fp16 | bf16
    "channels_last": True,        # NHWC weights, so activations follow: faster convolutions, BN and pooling on CPUs
                                  # (oneDNN) and GPUs; numbers differ from NCHW by float rounding only
    # images
    "img_size": 224,
    "augmentation": "rrc",        # rrc: timm's random-resized-crop + flip | flip: flip only | none | resize<S>_crop
                                  # (e.g. resize600_crop): S×S resize, random img_size crop, flip; eval: S×S resize,
                                  # centre crop (the fine-grained baselines' pipeline, loaders.build_transforms)
    # evaluation
    "precise_bn_batches": 0,      # re-estimate BN statistics on this many train batches before each evaluation
    "seed": 1,
    # runs
    "sync_bn": False,             # with several processes: batch statistics of every norm layer over all of them
    "log_with": None,             # also hand metrics to accelerate's trackers: tensorboard | wandb | mlflow | all
}


def recipe_dir() -> Path:
    """The ``recipes/`` folder: ``$TIMM_BNINIT_RECIPES``, else the repository's (editable install), else ./recipes."""
    if os.environ.get("TIMM_BNINIT_RECIPES"):
        return Path(os.environ["TIMM_BNINIT_RECIPES"])
    repository = Path(__file__).resolve().parents[2] / "recipes"
    return repository if repository.is_dir() else Path.cwd() / "recipes"


def list_recipes() -> list[str]:
    folder = recipe_dir()
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def _unknown_key(key: str) -> RecipeError:
    hint = did_you_mean(key, list(DEFAULTS))
    return RecipeError(f"unknown recipe key {key!r}. {hint} Valid keys: {', '.join(sorted(DEFAULTS))}")


# What each key accepts, checked whenever a recipe is loaded or overridden: (type name, test of a typed value,
# the words of the error). A type is "bool", "int", "float", "str", "list" or "bool|str"; "?" after it admits None.
_TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "wsd", "rsqrt")
_NONNEG = (lambda v: v >= 0, "≥ 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, "≥ 1")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def _one_of(*choices: str) -> tuple:
    return (lambda v: v in choices, "one of " + ", ".join(choices))


def _class_list(value: list) -> bool:
    return len(value) >= 2 and len(set(value)) == len(value) and all(isinstance(c, int) and c >= 0 for c in value)


_ANY = (lambda v: True, "")
SCHEMA: dict[str, tuple[str, tuple]] = {
    "dataset": ("str", (lambda v: bool(v), "a data set name or folder")),
    "data_dir": ("str?", _ANY), "hub_revision": ("str?", _ANY),
    "classes": ("list?", (_class_list, "a list of ≥ 2 distinct class indices ≥ 0")),
    "preload": ("bool", _ANY), "val_fraction": ("float", _FRACTION), "split_seed": ("int", _NONNEG),
    "skip_corrupt": ("bool", _ANY), "num_workers": ("int", _NONNEG), "train_per_class": ("int?", _AT_LEAST_1),
    "input_bn": ("bool", _ANY), "protocol": ("str", _one_of("timm", "official")),
    "model": ("str", (lambda v: bool(v), "a timm model name")), "pretrained": ("bool|str", _ANY),
    "pretrained_file": ("str?", _ANY), "norm_layer": ("str?", _ANY),
    "bn_transfer": ("str", _one_of(*BN_TRANSFER_POLICIES)),
    "gamma_init": ("float?", _POSITIVE), "gamma_lr_div": ("float?", _POSITIVE),
    "zero_init_last": ("bool", _ANY), "cifar_stem": ("bool", _ANY), "bn_only": ("bool", _ANY),
    "train_classifier": ("bool", _ANY), "drop_rate": ("float", _FRACTION), "drop_path_rate": ("float", _FRACTION),
    "optimizer": ("str", (lambda v: bool(v), "a timm optimizer name (timm.optim.list_optimizers())")),
    "fused_optimizer": ("bool", _ANY),
    "lr": ("float", _POSITIVE), "momentum": ("float", _FRACTION), "weight_decay": ("float", _NONNEG),
    "sched": ("str", _one_of(*_TIMM_SCHEDULERS)), "step_on_epochs": ("bool", _ANY),
    "warmup_epochs": ("int", _NONNEG), "warmup_lr": ("float", _NONNEG), "min_lr": ("float", _NONNEG),
    "decay_milestones": ("list?", (lambda v: bool(v) and all(isinstance(e, int) and e >= 1 for e in v),
                                   "a list of epochs ≥ 1")),
    "decay_rate": ("float", _POSITIVE),
    "epochs": ("int", _AT_LEAST_1), "batch_size": ("int", _AT_LEAST_1), "grad_accum_steps": ("int", _AT_LEAST_1),
    "label_smoothing": ("float", _FRACTION), "ema": ("bool", _ANY),
    "ema_decay": ("float", (lambda v: 0 < v < 1, "in (0, 1)")),
    "mixed_precision": ("str", _one_of("no", "fp16", "bf16")), "channels_last": ("bool", _ANY),
    "img_size": ("int", (lambda v: v >= 8, "≥ 8")),
    "augmentation": ("str", (lambda v: v in ("rrc", "flip", "none") or (resize_crop_size(v) or 0) >= 8,
                             "rrc, flip, none, or resize<S>_crop with S ≥ 8 such as resize600_crop")),
    "precise_bn_batches": ("int", _NONNEG),
    "seed": ("int", _NONNEG), "sync_bn": ("bool", _ANY),
    "log_with": ("str?", _one_of("tensorboard", "wandb", "mlflow", "all")),
}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NULL = ("null", "none", "~", "")


def _describe(kind: str, words: str) -> str:
    base = kind.rstrip("?")
    names = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "list": "a list", "bool|str": "true, false or a hub tag"}
    text = names[base] + (f" {words}" if words and base in ("int", "float") else f" ({words})" if words else "")
    return text + (", or null" if kind.endswith("?") else "")


def _typed(kind: str, value: Any) -> Any:
    """``value`` as ``kind``; text (from ``--set``) is read as the key's own type: ``no`` stays a string for a
    string key. Raises ValueError when it is not of that type."""
    base, text = kind.rstrip("?"), value.strip() if isinstance(value, str) else None
    if value is None or (text is not None and text.lower() in _NULL and kind.endswith("?")):
        if kind.endswith("?"):
            return None
        raise ValueError
    if base in ("bool", "bool|str"):
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if base == "bool|str" and text:
            return text  # a hub tag such as resnet50.tv_in1k
        raise ValueError
    if base == "int":
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else float(text)
        if not float(number).is_integer():
            raise ValueError
        return int(number)
    if base == "float":
        if isinstance(value, bool):
            raise ValueError
        return float(value) if not isinstance(value, str) else float(text)
    if base == "str":
        if text is None:
            raise ValueError
        return text
    parsed = yaml.safe_load(value) if text is not None else value  # list
    if not isinstance(parsed, list):
        raise ValueError
    return parsed


def _coerce(key: str, value: Any) -> Any:
    """``value`` given the type ``key`` expects and checked against its range; a RecipeError names both."""
    kind, (check, words) = SCHEMA[key]
    try:
        typed = _typed(kind, value)
    except (TypeError, ValueError):
        raise RecipeError(f"recipe key {key!r} expects {_describe(kind, words)}, got {value!r}") from None
    if typed is not None and not isinstance(typed, bool) and not check(typed):
        raise RecipeError(f"recipe key {key!r} expects {_describe(kind, words)}, got {value!r}")
    return typed


# What ``protocol: official`` pins: Davis & Frank's train.py (osu-cvl/revisiting-bn-init @ 8ff3592) builds torch
# ``SGD(momentum=...)`` (timm's "momentum": no Nesterov; timm's "sgd" is Nesterov), ``CosineAnnealingLR(T_max=epochs,
# eta_min=1e-8)`` stepped once per epoch (timm's cosine with step_on_epochs has the same closed form), no warmup,
# plain cross-entropy, no EMA, no dropout, and trains from scratch. The init is protocol.apply_official_init's.
OFFICIAL_PROTOCOL: dict[str, Any] = {
    "optimizer": "momentum", "sched": "cosine", "step_on_epochs": True, "warmup_epochs": 0, "min_lr": 1e-8,
    "zero_init_last": False, "pretrained": False, "pretrained_file": None, "label_smoothing": 0.0, "ema": False,
    "drop_rate": 0.0, "drop_path_rate": 0.0,
}


def _pin_protocol(config: dict[str, Any], given: dict[str, Any], where: str) -> None:
    """With ``protocol: official``, set the keys it pins; one of them ``given`` another value here is refused."""
    if config["protocol"] != "official":
        return
    for key, value in OFFICIAL_PROTOCOL.items():
        if key in given and given[key] != value:
            raise RecipeError(f"{where}: protocol 'official' sets {key}={value!r} (the official code's), got "
                              f"{given[key]!r}; drop {key} or use protocol=timm")
        config[key] = value


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
    _pin_protocol(config, {key: config[key] for key in loaded}, f"in {path}")
    try:
        config["recipe"] = str(path.resolve().relative_to(recipe_dir().resolve()).with_suffix(""))
    except ValueError:  # a recipe file outside recipes/
        config["recipe"] = str(path)
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` overrides, each value read as the type its key expects and range-checked."""
    config, given = dict(config), {}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. --set lr=0.01)")
        if key not in DEFAULTS:
            raise _unknown_key(key)
        config[key] = given[key] = _coerce(key, text)
    _pin_protocol(config, given, "--set")
    return config


def check_config(config: dict[str, Any]) -> None:
    """Refuse, before any work, what cannot run: a value of the wrong type or range (also in a config built in
    code), an unknown model, norm layer or optimizer, a γ0 for a layer that has none, a missing weights file."""
    unknown = set(config) - set(DEFAULTS) - {"recipe"}
    if unknown:
        raise _unknown_key(sorted(unknown)[0])
    for key in DEFAULTS:
        _coerce(key, config[key])
    _pin_protocol(dict(config), {key: config[key] for key in OFFICIAL_PROTOCOL}, "config")
    try:
        kind, folder = resolve_source(config["dataset"], config["data_dir"])
    except DatasetError as error:
        raise RecipeError(f"recipe key 'dataset'/'data_dir': {error}") from None
    if config["hub_revision"] is not None and (folder is not None or kind not in HUB_COPIES):
        raise RecipeError(f"recipe key 'hub_revision' selects a commit of a hub copy ({', '.join(HUB_COPIES)}), but "
                          f"{config['dataset']!r} is read from {'a local folder' if folder else 'elsewhere'}; drop it")
    if not timm.is_model(config["model"]):
        hint = did_you_mean(config["model"], timm.list_models())
        raise RecipeError(f"recipe key 'model': unknown timm model {config['model']!r}. {hint} "
                          f"See timm.list_models().")
    if config["optimizer"].lower() not in timm.optim.list_optimizers():
        hint = did_you_mean(config["optimizer"], timm.optim.list_optimizers())
        raise RecipeError(f"recipe key 'optimizer': unknown timm optimizer {config['optimizer']!r}. {hint} "
                          f"See timm.optim.list_optimizers().")
    try:
        norm = resolve_norm_layer(config["norm_layer"])[0] if config["norm_layer"] is not None else None
    except UnknownNormLayerError as error:
        raise RecipeError(f"recipe key 'norm_layer': {error}") from None
    if config["gamma_init"] is not None:
        base = getattr(norm, "func", norm)
        if not (isinstance(base, type) and issubclass(base, BatchNormGamma2d)):
            raise RecipeError(f"recipe key 'gamma_init': gamma_init sets γ0 of a bn_gamma* layer, but norm_layer is "
                              f"{config['norm_layer']!r}; use e.g. norm_layer=bn_gamma1 gamma_init=0.731")
    crop_from = resize_crop_size(config["augmentation"])
    if crop_from is not None and crop_from < config["img_size"]:
        raise RecipeError(f"recipe key 'augmentation': {config['augmentation']} resizes to {crop_from} px, smaller "
                          f"than the {config['img_size']} px crop (img_size); resize to at least img_size")
    for tracker, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available),
                               ("mlflow", is_mlflow_available)):
        if config["log_with"] == tracker and not available():
            raise RecipeError(f"recipe key 'log_with': {tracker} is not installed; pip install {tracker}, or drop "
                              f"log_with (metrics.jsonl is written either way)")
    if config["pretrained_file"] is not None and not Path(config["pretrained_file"]).is_file():
        raise RecipeError(f"pretrained_file {config['pretrained_file']!r} does not exist (recipe key "
                          f"'pretrained_file'); pass the path of a .safetensors/.pth/.bin weights file")
