"""Recipes: YAML files of hyper-parameters, every key overridable from the command line, unknown keys refused.

Every key is declared once, as a field of :class:`Recipe`: its type (the annotation), default, accepted range and
help together. Loading a file, ``--set key=value``, the checks, ``config.yaml`` and ``finetune.py --list-keys`` all
read that declaration. A resolved recipe is a frozen ``Recipe``; change one with :func:`apply_overrides` (or
``dataclasses.replace`` in code, then :func:`check_config`).

Example::

    recipe = apply_overrides(load_recipe("cub"), ["norm_layer=bn_gamma01", "lr=0.01"])
    check_config(recipe)
    print(recipe.lr, recipe.norm_layer)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import timm
import timm.optim
import yaml
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from ..convert import BN_TRANSFER_POLICIES
from ..data import DatasetError, get_dataset, list_datasets, resolve_source
from ..data.pipeline import PIPELINES
from ..errors import RecipeError, did_you_mean
from ..norm import BatchNormGamma2d
from ..registry import UnknownNormLayerError, resolve_norm_layer

__all__ = ["Recipe", "RecipeKey", "KEYS", "GROUPS", "OFFICIAL_PROTOCOL", "RecipeError", "key", "Check", "one_of",
           "named", "ANY", "NONNEG", "POSITIVE", "AT_LEAST_1", "FRACTION", "check_config", "recipe_dir",
           "list_recipes", "load_recipe", "recipe_from_mapping", "apply_overrides", "import_user_modules",
           "keys_text", "resize_crop_size", "resize_crop_problem", "COMPILE_MODES"]


# ---------------------------------------------------------------------------------------------------------------
# How a key is declared


class Check(NamedTuple):
    """What a key accepts beyond its type: a test of the typed value and the words an error uses for it."""

    test: Callable[[Any], bool]
    words: str


ANY = Check(lambda value: True, "")
NONNEG = Check(lambda value: value >= 0, "≥ 0")
POSITIVE = Check(lambda value: value > 0, "> 0")
AT_LEAST_1 = Check(lambda value: value >= 1, "≥ 1")
FRACTION = Check(lambda value: 0 <= value < 1, "in [0, 1)")


def one_of(*choices: str) -> Check:
    return Check(lambda value: value in choices, "one of " + ", ".join(choices))


def named(words: str) -> Check:
    """A name that only a later stage can judge (a model, an optimizer): here it must not be empty."""
    return Check(bool, words)


GROUPS = ("data", "model", "optimisation", "images", "evaluation", "runs")  # the order --list-keys prints them in


def key(default: Any, *, group: str, help: str, check: Check = ANY, changes_result: bool = True) -> Any:
    """Declare a recipe key: a :class:`Recipe` field whose default, range check, help and group travel with it.

    ``changes_result=False`` declares that no value of the key changes a run's numbers (how many workers load the
    data, where metrics are copied to), so a ``--resume`` may give it another value than the run started with; a
    resume that changes any other key is refused. Declare it only with a test that shows the numbers stay the same.

    Example::

        lr: float = key(0.01, group="optimisation", check=POSITIVE, help="base learning rate")
    """
    if group not in GROUPS:
        raise RecipeError(f"recipe key group {group!r} is not one of {', '.join(GROUPS)}")
    metadata = {"group": group, "help": help, "check": check, "changes_result": changes_result}
    if isinstance(default, list):  # a mutable default: each recipe gets its own copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def resize_crop_size(augmentation: str) -> int | None:
    """S of a ``resize<S>_crop`` augmentation (``resize600_crop`` -> 600); None for any other mode."""
    middle = augmentation[len("resize"):-len("_crop")]
    if augmentation.startswith("resize") and augmentation.endswith("_crop") and middle.isascii() and middle.isdigit():
        return int(middle)
    return None


def resize_crop_problem(augmentation: str, img_size: int) -> str | None:
    """Why ``augmentation`` cannot cut ``img_size`` crops (a ``resize<S>_crop`` with S < img_size), or None.

    The one definition of this check: the recipe's :func:`check_config` and the loaders' transforms both ask it.
    """
    resize = resize_crop_size(augmentation)
    if resize is None or resize >= img_size:
        return None
    return (f"{augmentation!r} resizes to {resize}×{resize}, smaller than the img_size={img_size} "
            f"crop; use resize<S>_crop with S ≥ {img_size}")


def _class_list(value: list) -> bool:
    return len(value) >= 2 and len(set(value)) == len(value) and all(isinstance(c, int) and c >= 0 for c in value)


_TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "wsd", "rsqrt")
_AUGMENTATIONS = ("rrc", "flip", "none")
# torch.compile's modes in every torch the project supports (torch._inductor.list_mode_options(), torch ≥ 2.4)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------------------------
# Every key


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a run, each declared once with its type, default, range and help.

    A recipe file sets a subset; ``--set key=value`` overrides any; ``finetune.py --list-keys`` prints them all.
    ``recipe`` is not a key: it records where the values came from (the recipe's name, or its path outside
    ``recipes/``), is written to ``config.yaml`` and names the default run directory; ``--set`` cannot set it.
    """

    # data
    dataset: str = key("digits", group="data", check=named("a data set name or folder"),
                       help="cub | cars | digits | imagefolder | cifar10 | cifar100, or a folder")
    data_dir: str | None = key(None, group="data",
                               help="local copy (official archive layout or imagefolder); null: the hub copy")
    hub_revision: str | None = key(None, group="data",
                                   help="hub commit, branch or tag of the CUB/Cars hub copy; null: the pinned commit")
    classes: list[int] | None = key(None, group="data",
                                    check=Check(_class_list, "a list of ≥ 2 distinct class indices ≥ 0"),
                                    help="keep only these class indices (relabelled 0..k-1 in this order); null: all")
    preload: bool = key(False, group="data", changes_result=False,  # tests/test_train.py: the same numbers
                        help="decode every image once per process and keep it in memory (small data sets)")
    val_fraction: float = key(0.1, group="data", check=FRACTION,
                              help="stratified fraction of train held out for model selection")
    split_seed: int = key(0, group="data", check=NONNEG, help="seed of that split: fixed, never the run seed")
    skip_corrupt: bool = key(False, group="data",
                             help="skip unreadable images (counted in final.json) instead of failing")
    train_per_class: int | None = key(None, group="data", check=AT_LEAST_1,
                                      help="keep the first k train images of each class (order drawn with "
                                           "split_seed), after the validation split, which stays as it is; null: all")
    num_workers: int = key(2, group="data", check=NONNEG, changes_result=False,  # augmentation: f(seed, epoch, index)
                           help="DataLoader worker processes")
    # model
    model: str = key("resnet18", group="model", check=named("a timm model name"), help="a timm model name")
    pretrained: bool | str = key(False, group="model",
                                 help="true: the model's timm hub weights; a string: a hub tag; false: from scratch")
    pretrained_file: str | None = key(None, group="model", help="local weights file used instead of the hub")
    norm_layer: str | None = key(None, group="model",
                                 help="null: plain BN (BASE); or a timm-bninit name such as bn_gamma01")
    bn_transfer: str = key("keep", group="model", check=one_of(*BN_TRANSFER_POLICIES),
                           help="what a pretrained γ becomes: keep | reset | scale")
    gamma_init: float | None = key(None, group="model", check=POSITIVE,
                                   help="γ0 of a bn_gamma* layer other than its name's (e.g. 0.731, RBN's initial "
                                        "scale)")
    gamma_lr_div: float | None = key(None, group="model", check=POSITIVE,
                                     help="γ learning-rate divisor c for every BN; null: the variant's own (plain "
                                          "BN: 1)")
    zero_init_last: bool = key(False, group="model",
                               help="keep timm ResNets' zeroed last-BN γ (false: every BN starts at its γ0, BASE at 1)")
    cifar_stem: bool = key(False, group="model", help="3×3 stride-1 stem without max-pool (the paper's CIFAR ResNets)")
    bn_only: bool = key(False, group="model",
                        help="train only BN γ/β (Frankle et al.); running statistics still update")
    train_classifier: bool = key(True, group="model", help="with bn_only: keep the output layer trainable")
    drop_rate: float = key(0.0, group="model", check=FRACTION, help="dropout before the classifier (timm's)")
    drop_path_rate: float = key(0.0, group="model", check=FRACTION, help="stochastic depth rate (timm's)")
    input_bn: bool = key(False, group="model",
                         help="a BN (γ = 0.58·γ0, β frozen at 0) in front of the network on [0, 1] pixels instead of "
                              "mean/std normalisation (the official code's input normalisation)")
    # optimisation
    protocol: str = key("timm", group="optimisation", check=one_of("timm", "official"),
                        help="timm | official: pin the keys of OFFICIAL_PROTOCOL (Davis & Frank's code, "
                             "docs/methods.md §1) and use its init (fan_in convs, zero biases, γ0 on every BN)")
    optimizer: str = key("sgd", group="optimisation",
                         check=named("a timm optimizer name (timm.optim.list_optimizers())"),
                         help="a timm optimizer name (timm's sgd is Nesterov, momentum is plain)")
    fused_optimizer: bool = key(True, group="optimisation",
                                help="torch's fused kernel for torch's optimizers (sgd, momentum, adam, adamw): the "
                                     "same update, faster; it rounds differently from the per-tensor loop in the last "
                                     "bit")
    lr: float = key(0.01, group="optimisation", check=POSITIVE, help="base learning rate (γ gets lr / c)")
    momentum: float = key(0.9, group="optimisation", check=FRACTION, help="SGD momentum")
    weight_decay: float = key(1e-4, group="optimisation", check=NONNEG, help="conv/linear weights only")
    sched: str = key("cosine", group="optimisation", check=one_of(*_TIMM_SCHEDULERS), help="a timm scheduler name")
    step_on_epochs: bool = key(False, group="optimisation",
                               help="step the schedule once per epoch (the paper) instead of every update")
    warmup_epochs: int = key(0, group="optimisation", check=NONNEG, help="epochs of linear warm-up")
    warmup_lr: float = key(1e-5, group="optimisation", check=NONNEG, help="learning rate the warm-up starts at")
    min_lr: float = key(0.0, group="optimisation", check=NONNEG, help="floor of the schedule")
    decay_milestones: list[int] | None = key(
        None, group="optimisation",
        check=Check(lambda v: bool(v) and all(isinstance(e, int) and e >= 1 for e in v), "a list of epochs ≥ 1"),
        help="sched multistep: the epochs at which lr is multiplied by decay_rate; null: timm's")
    decay_rate: float = key(0.1, group="optimisation", check=POSITIVE, help="factor of a step or multistep decay")
    epochs: int = key(10, group="optimisation", check=AT_LEAST_1, help="training epochs")
    batch_size: int = key(64, group="optimisation", check=AT_LEAST_1,
                          help="the global batch, split over the processes of a distributed run")
    grad_accum_steps: int = key(1, group="optimisation", check=AT_LEAST_1,
                                help="batches whose gradients are accumulated into one update")
    label_smoothing: float = key(0.0, group="optimisation", check=FRACTION, help="of the cross-entropy loss")
    ema: bool = key(False, group="optimisation", help="evaluate an exponential moving average of the weights")
    ema_decay: float = key(0.9998, group="optimisation", check=Check(lambda v: 0 < v < 1, "in (0, 1)"),
                           help="decay of that average per update")
    mixed_precision: str = key("no", group="optimisation", check=one_of("no", "fp16", "bf16"),
                               help="no | fp16 | bf16 (accelerate's)")
    channels_last: bool = key(True, group="optimisation",
                              help="NHWC weights, so activations follow: faster convolutions, BN and pooling on CPUs "
                                   "(oneDNN) and GPUs; numbers differ from NCHW by float rounding only")
    compile: bool = key(False, group="optimisation",
                        help="torch.compile the model (inductor) for training and evaluation, as timm's "
                             "--torchcompile: the same steps up to float rounding, faster once compiled; compiling "
                             "takes minutes first, so it pays on long GPU runs (docs/guide/finetuning.md)")
    compile_mode: str | None = key(None, group="optimisation", check=one_of(*COMPILE_MODES),
                                   help="with compile: torch.compile's mode (reduce-overhead: CUDA graphs; "
                                        "max-autotune: longer compilation, tuned kernels); null: default")
    # images
    img_size: int = key(224, group="images", check=Check(lambda v: v >= 8, "≥ 8"), help="training and eval crop (px)")
    augmentation: str = key(
        "rrc", group="images",
        check=Check(lambda v: v in _AUGMENTATIONS or (resize_crop_size(v) or 0) >= 8,
                    "rrc, flip, none, or resize<S>_crop with S ≥ 8 such as resize600_crop"),
        help="rrc: timm's create_transform training (random-resized crop, flip, colour jitter 0.4) | flip: flip only | "
             "none | resize<S>_crop (e.g. resize600_crop): S×S resize, random img_size crop, flip; eval: S×S resize, "
             "centre crop (the fine-grained baselines' pipeline, loaders.build_transforms)")
    decode: str = key("fast", group="images", check=one_of(*PIPELINES),
                      help="how the workers decode and augment: fast: torchvision's JPEG decoder and transforms.v2 on "
                           "uint8 tensors, the same crops as pil, pixels a resampling rounding apart | pil: PIL decode "
                           "and transforms, as runs had before (the study recipes pin it). Both hand uint8 to the "
                           "device, which converts and normalises (data/pipeline.py)")
    # evaluation
    precise_bn_batches: int = key(0, group="evaluation", check=NONNEG,
                                  help="re-estimate BN statistics on this many train batches before each evaluation")
    seed: int = key(1, group="evaluation", check=NONNEG,
                    help="the run seed: data order, augmentation, initialisation (paired across methods)")
    # runs
    sync_bn: bool = key(False, group="runs",
                        help="with several processes: batch statistics of every norm layer over all of them")
    log_with: str | None = key(None, group="runs", check=one_of("tensorboard", "wandb", "mlflow", "all"),
                               changes_result=False,  # a copy of what metrics.jsonl records
                               help="also hand metrics to accelerate's trackers: tensorboard | wandb | mlflow | all")
    imports: list[str] = key([], group="runs",
                             check=Check(lambda v: all(isinstance(m, str) and m.strip() for m in v),
                                         "a list of module names"),
                             help="modules imported before anything is built, in every process (mmcv's "
                                  "custom_imports): a module of your own that registers a norm layer or a data set "
                                  "lets this recipe name it; it must be importable (on PYTHONPATH)")
    # not a key: where the values came from
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every key and ``recipe``, as ``config.yaml`` records them."""
        return dataclasses.asdict(self)


class RecipeKey(NamedTuple):
    """One declared key, as the parser, the checks and ``--list-keys`` read it."""

    name: str
    annotation: str     # the declared type as written, e.g. ``float | None``
    kind: str           # what text is read as: bool, int, float, str, list or bool|str; "?" after it admits None
    default: Any
    check: Check
    help: str
    group: str
    changes_result: bool  # False: a resume may give it another value (key's changes_result)


def _kind(annotation: Any) -> str:
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    names = [(typing.get_origin(m) or m).__name__ for m in members if m is not type(None)]
    return "|".join(names) + ("?" if type(None) in members else "")


def _declared_keys() -> dict[str, RecipeKey]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: RecipeKey(f.name, str(f.type), _kind(hints[f.name]),
                              f.default_factory() if f.default is dataclasses.MISSING else f.default,
                              f.metadata["check"], f.metadata["help"], f.metadata["group"],
                              f.metadata.get("changes_result", True))
            for f in dataclasses.fields(Recipe) if "group" in f.metadata}


KEYS: dict[str, RecipeKey] = _declared_keys()


# ---------------------------------------------------------------------------------------------------------------
# Reading values as their key's type

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


def _coerce(name: str, value: Any) -> Any:
    """``value`` given the type key ``name`` expects and checked against its range; a RecipeError names both."""
    spec = KEYS[name]
    try:
        typed = _typed(spec.kind, value)
    except (TypeError, ValueError):
        raise RecipeError(f"recipe key {name!r} expects {_describe(spec.kind, spec.check.words)}, got {value!r}") \
            from None
    if typed is not None and not isinstance(typed, bool) and not spec.check.test(typed):
        raise RecipeError(f"recipe key {name!r} expects {_describe(spec.kind, spec.check.words)}, got {value!r}")
    return typed


def _unknown_key(name: str) -> RecipeError:
    hint = did_you_mean(name, list(KEYS))
    return RecipeError(f"unknown recipe key {name!r}. {hint} Valid keys: {', '.join(sorted(KEYS))}")


def _text(value: Any) -> str:
    """A value as ``--set`` and YAML write it."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_text, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def keys_text() -> str:
    """Every key with its type, default, accepted values and help, in its group (``finetune.py --list-keys``)."""
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        for spec in (s for s in KEYS.values() if s.group == group):
            lines.append(f"  {spec.name}: {spec.annotation} = {_text(spec.default)}    accepts "
                         f"{_describe(spec.kind, spec.check.words)}"
                         + ("" if spec.changes_result else "    (may differ on --resume)"))
            lines += textwrap.wrap(spec.help, width=116, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Files and overrides

# What ``protocol: official`` pins: Davis & Frank's train.py (osu-cvl/revisiting-bn-init @ 8ff3592) builds torch
# ``SGD(momentum=...)`` (timm's "momentum": no Nesterov; timm's "sgd" is Nesterov), ``CosineAnnealingLR(T_max=epochs,
# eta_min=1e-8)`` stepped once per epoch (timm's cosine with step_on_epochs has the same closed form), no warmup,
# plain cross-entropy, no EMA, no dropout, and trains from scratch. The init is protocol.apply_official_init's.
OFFICIAL_PROTOCOL: dict[str, Any] = {
    "optimizer": "momentum", "sched": "cosine", "step_on_epochs": True, "warmup_epochs": 0, "min_lr": 1e-8,
    "zero_init_last": False, "pretrained": False, "pretrained_file": None, "label_smoothing": 0.0, "ema": False,
    "drop_rate": 0.0, "drop_path_rate": 0.0,
}


def _pinned(protocol: str, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The keys ``protocol`` pins (none unless ``official``); one of them ``given`` another value is refused."""
    if protocol != "official":
        return {}
    for name, value in OFFICIAL_PROTOCOL.items():
        if name in given and given[name] != value:
            raise RecipeError(f"{where}: protocol 'official' sets {name}={value!r} (the official code's), got "
                              f"{given[name]!r}; drop {name} or use protocol=timm")
    return dict(OFFICIAL_PROTOCOL)


def recipe_dir() -> Path:
    """The ``recipes/`` folder: ``$TIMM_BNINIT_RECIPES``, else the repository's (editable install), else ./recipes."""
    if os.environ.get("TIMM_BNINIT_RECIPES"):
        return Path(os.environ["TIMM_BNINIT_RECIPES"])
    repository = Path(__file__).resolve().parents[2] / "recipes"
    return repository if repository.is_dir() else Path.cwd() / "recipes"


def list_recipes() -> list[str]:
    folder = recipe_dir()
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def recipe_from_mapping(values: Mapping[str, Any], where: str = "config") -> Recipe:
    """A recipe from keys and values (a run's ``config.yaml``, a dict in code), checked as a recipe file is.

    Each value is read as its key's type and range-checked, an unknown key is refused, a key the mapping lacks takes
    its default (a ``config.yaml`` written before the key existed), and ``protocol: official`` sets what it pins.
    ``recipe``, the source, is taken as it is.
    """
    given = {}
    for name, value in values.items():
        if name not in KEYS and name != "recipe":
            raise RecipeError(f"{where}: {_unknown_key(name)}")
        given[name] = value if name == "recipe" else _coerce(name, value)
    return Recipe(**{**given, **_pinned(given.get("protocol", KEYS["protocol"].default), given, where)})


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
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
    if "recipe" in loaded:  # the source is recorded, never set
        raise RecipeError(f"in {path}: {_unknown_key('recipe')}")
    try:
        source = str(path.resolve().relative_to(recipe_dir().resolve()).with_suffix(""))
    except ValueError:  # a recipe file outside recipes/
        source = str(path)
    return dataclasses.replace(recipe_from_mapping(loaded, f"in {path}"), recipe=source)


def apply_overrides(recipe: Recipe, overrides: Sequence[str] | None) -> Recipe:
    """``recipe`` with ``key=value`` overrides, each value read as the type its key expects and range-checked."""
    given = {}
    for item in overrides or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. --set lr=0.01)")
        if name not in KEYS:
            raise _unknown_key(name)
        given[name] = _coerce(name, text)
    return dataclasses.replace(recipe, **{**given, **_pinned(given.get("protocol", recipe.protocol), given, "--set")})


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work


def import_user_modules(modules: Sequence[str]) -> None:
    """Import the recipe's ``imports``, so that what they register (a norm layer, a data set) can be named.

    Every process of a run calls this through :func:`check_config`; importing a module a second time is free.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            reason = " ".join(str(error).split())  # one line, whatever the import machinery said
            raise RecipeError(f"recipe key 'imports': cannot import {name!r} ({reason}); is it on PYTHONPATH?") \
                from None


def _check_data(recipe: Recipe) -> None:
    try:
        kind, folder = resolve_source(recipe.dataset, recipe.data_dir)
    except DatasetError as error:
        raise RecipeError(f"recipe key 'dataset'/'data_dir': {error}") from None
    if recipe.hub_revision is not None and (folder is not None or get_dataset(kind).hub is None):
        copies = ", ".join(name for name in list_datasets() if get_dataset(name).hub is not None)
        raise RecipeError(f"recipe key 'hub_revision' selects a commit of a hub copy ({copies}), but "
                          f"{recipe.dataset!r} is read from {'a local folder' if folder else 'elsewhere'}; drop it")


def _check_model(recipe: Recipe) -> None:
    if not timm.is_model(recipe.model):
        hint = did_you_mean(recipe.model, timm.list_models())
        raise RecipeError(f"recipe key 'model': unknown timm model {recipe.model!r}. {hint} See timm.list_models().")
    if recipe.optimizer.lower() not in timm.optim.list_optimizers():
        hint = did_you_mean(recipe.optimizer, timm.optim.list_optimizers())
        raise RecipeError(f"recipe key 'optimizer': unknown timm optimizer {recipe.optimizer!r}. {hint} "
                          f"See timm.optim.list_optimizers().")
    try:
        norm = resolve_norm_layer(recipe.norm_layer)[0] if recipe.norm_layer is not None else None
    except UnknownNormLayerError as error:
        raise RecipeError(f"recipe key 'norm_layer': {error}") from None
    if recipe.gamma_init is not None:
        base = getattr(norm, "func", norm)
        if not (isinstance(base, type) and issubclass(base, BatchNormGamma2d)):
            raise RecipeError(f"recipe key 'gamma_init': gamma_init sets γ0 of a bn_gamma* layer, but norm_layer is "
                              f"{recipe.norm_layer!r}; use e.g. norm_layer=bn_gamma1 gamma_init=0.731")


def check_config(recipe: Recipe) -> None:
    """Refuse, before any work, what cannot run: a value of the wrong type or range (also in a recipe built in
    code), a module of ``imports`` that cannot be imported, an unknown data set, model, norm layer or optimizer, a
    γ0 for a layer that has none, a compile mode without compile, a resize smaller than the crop, a missing tracker or
    weights file."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"check_config expects a Recipe (load_recipe, apply_overrides, or recipe_from_mapping for a "
                          f"mapping of keys to values), got {type(recipe).__name__}")
    for name in KEYS:
        _coerce(name, getattr(recipe, name))
    _pinned(recipe.protocol, {name: getattr(recipe, name) for name in OFFICIAL_PROTOCOL}, "config")
    import_user_modules(recipe.imports)  # before any name is resolved: they may register the names used below
    _check_data(recipe)
    _check_model(recipe)
    if recipe.compile_mode is not None and not recipe.compile:
        raise RecipeError(f"recipe key 'compile_mode': {recipe.compile_mode!r} is a mode of torch.compile, but compile "
                          f"is false; set compile=true, or compile_mode=null")
    problem = resize_crop_problem(recipe.augmentation, recipe.img_size)
    if problem is not None:
        raise RecipeError(f"recipe key 'augmentation': {problem}")
    for tracker, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available),
                               ("mlflow", is_mlflow_available)):
        if recipe.log_with == tracker and not available():
            raise RecipeError(f"recipe key 'log_with': {tracker} is not installed; pip install {tracker}, or drop "
                              f"log_with (metrics.jsonl is written either way)")
    if recipe.pretrained_file is not None and not Path(recipe.pretrained_file).is_file():
        raise RecipeError(f"pretrained_file {recipe.pretrained_file!r} does not exist (recipe key "
                          f"'pretrained_file'); pass the path of a .safetensors/.pth/.bin weights file")
