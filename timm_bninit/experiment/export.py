"""A finished run as a timm model folder, shared the way timm users share models: :func:`export_run`, :func:`push`.

The folder is what timm's ``push_to_hf_hub`` uploads, written by timm's own ``save_for_hf``: ``config.json``
(``architecture``, ``num_classes``, ``label_names``, ``model_args`` with the norm layer, ``pretrained_cfg`` with the
run's preprocessing), ``model.safetensors``, and a model card, ``README.md``. After ``import timm_bninit``,
``timm.create_model("local-dir:<folder>", pretrained=True)`` (or ``"hf-hub:<repo>"`` once pushed) loads the model
the run evaluated. What timm's config cannot name is exported so that it still loads to the same outputs, or refused:

* the official protocol's input BN (``input_bn``) is an affine map of the pixels in eval mode, so it is folded into
  ``pretrained_cfg``'s ``mean`` and ``std`` (:func:`fold_input_bn`); a γ ≤ 0 cannot be a std and is refused;
* the CIFAR stem is named by the timm model ``timm_bninit.cifar_stem`` registers (``resnet18_cifar_stem``);
* the norm layer is the recipe's registered name: a variant's options that act only in training (``gamma_init``,
  the γ learning-rate divisor, the blended σ's α) change no eval output, and one that changes the forward
  (RBN/IEBN's ``identity_init``) is part of the name (``rbn_unit``).

Before anything is written, the folder is loaded back through ``timm.create_model("local-dir:...")`` and its outputs
compared with the run's model on the same pixels (:func:`check_same_outputs`): an export that would load to another
function is refused, never written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.models import get_pretrained_cfg, save_for_hf
from torch import nn

from .. import __version__
from ..cifar_stem import cifar_stem_name
from ..errors import BNInitError
from ..registry import get_norm_layer
from . import layout
from .protocol import InputBatchNorm
from .recipe import Recipe
from .trained import OUTPUT_RTOL, load_run, read_run_config, trained_cfg, weight_problems

__all__ = ["ExportError", "Export", "export_run", "fold_input_bn", "timm_architecture", "check_same_outputs",
           "model_card", "push"]

EXPORT_FILES = ("config.json", "model.safetensors", "README.md")
DEFAULT_LICENSE = "apache-2.0"  # timm's model cards' default, and this project's licence


class ExportError(BNInitError, ValueError):
    """A run that cannot be exported as asked, or a folder that cannot be pushed; the message says why."""


@dataclass
class Export:
    """What :func:`export_run` wrote: the folder, the timm call that rebuilds the model, and what was adapted."""

    folder: Path
    architecture: str
    model_args: dict[str, Any]
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    max_output_difference: float = 0.0


def timm_architecture(config: Recipe) -> str:
    """The timm model name that builds the run's architecture: ``config.model``, or its CIFAR-stem name."""
    if not config.cifar_stem:
        return config.model
    name = cifar_stem_name(config.model)
    if not timm.is_model(name):
        raise ExportError(f"the run uses {config.model} with the CIFAR stem, which timm's config cannot express and "
                          f"no timm model is registered for; register {name!r} with "
                          f"timm_bninit.register_cifar_stem_model({config.model!r}) in a module the recipe's "
                          f"`imports` lists, or use the run through timm_bninit.load_run")
    return name


def fold_input_bn(input_bn: nn.BatchNorm2d, mean: tuple[float, ...], std: tuple[float, ...]
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``mean`` and ``std`` with which timm's ``Normalize`` computes what the eval-mode ``input_bn`` computed
    after normalising with (``mean``, ``std``).

    Per channel, with pixels p, z = (p − m0)/s0 and BN's y = (z − μ)·γ/σ + β (σ = sqrt(running_var + ε)):
    y = (p − m')/s' with s' = s0·σ/γ and m' = m0 + s0·(μ − β·σ/γ). Only γ > 0 gives a std s' > 0.

    Raises:
        ExportError: A γ ≤ 0 (a sign flip or a constant channel is no mean/std normalisation).
    """
    gamma = input_bn.weight.detach().double()
    if not bool((gamma > 0).all()):
        raise ExportError(f"the input BN has γ = {[round(g, 6) for g in gamma.tolist()]}: a γ ≤ 0 cannot be folded "
                          f"into pretrained_cfg's mean and std (a std must be > 0); use the run through "
                          f"timm_bninit.load_run")
    beta = input_bn.bias.detach().double() if input_bn.bias is not None else torch.zeros_like(gamma)
    sigma = (input_bn.running_var.detach().double() + input_bn.eps).sqrt()
    mean0, std0 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    folded_std = std0 * sigma / gamma
    folded_mean = mean0 + std0 * (input_bn.running_mean.detach().double() - beta * sigma / gamma)
    return tuple(folded_mean.tolist()), tuple(folded_std.tolist())


def _normalised(pixels: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    mean = torch.tensor(data_config["mean"], dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def check_same_outputs(reference: nn.Module, reference_data: dict[str, Any], candidate: nn.Module,
                       candidate_data: dict[str, Any], what: str) -> float:
    """The largest difference between the two models' logits on the same pixels, each normalised by its own data
    config; an ExportError when it exceeds :data:`OUTPUT_RTOL` of the largest logit."""
    size = tuple(reference_data["input_size"])
    pixels = torch.rand(2, *size, generator=torch.Generator().manual_seed(0))  # [0, 1], as after ToTensor
    expected = reference.eval()(_normalised(pixels, reference_data))
    got = candidate.eval()(_normalised(pixels, candidate_data))
    if got.shape != expected.shape:
        raise ExportError(f"{what} gives outputs of shape {tuple(got.shape)}, the run's model {tuple(expected.shape)}")
    difference = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    if not difference <= OUTPUT_RTOL * max(scale, 1e-6):
        raise ExportError(f"{what} computes other outputs than the run's model (largest logit difference "
                          f"{difference:.3g}, largest logit {scale:.3g}): timm's config cannot express this model; "
                          f"use the run through timm_bninit.load_run")
    return difference


def _create(architecture: str, cfg: dict[str, Any], model_args: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(architecture, pretrained_cfg=cfg, **model_args)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        reason = " ".join(str(error).split())
        raise ExportError(f"timm.create_model({architecture!r}, **{model_args}) fails ({reason}): timm's config "
                          f"cannot express this model; use the run through timm_bninit.load_run") from None


def _timm_model(config: Recipe, architecture: str, cfg: dict[str, Any], num_classes: int
                ) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """timm's build of the run's architecture from ``model_args`` alone: (model, model_args, notes).

    A family that takes no ``norm_layer=`` (timm_bninit.create_model converts its BN instead) can still be given a
    variant whose eval forward is plain BN's (γ0 and the γ learning rate act only in training): it is exported with
    timm's own BN, the same function; a variant with a forward of its own cannot be, and is refused.
    """
    model_args: dict[str, Any] = {"num_classes": num_classes}
    if config.norm_layer is None:
        return _create(architecture, cfg, model_args), model_args, []
    try:
        return _create(architecture, cfg, {**model_args, "norm_layer": config.norm_layer}), \
            {**model_args, "norm_layer": config.norm_layer}, []
    except ExportError:
        layer = get_norm_layer(config.norm_layer)
        if not getattr(getattr(layer, "func", layer), "plain_bn_forward", False):
            raise
    note = (f"timm's `{architecture}` takes no `norm_layer=`, and `{config.norm_layer}` computes plain BN in eval "
            f"mode (its γ0 and γ learning rate act only in training): the model is exported with timm's BatchNorm2d, "
            f"the same function.")
    return _create(architecture, cfg, model_args), model_args, [note]


def _build_exportable(config: Recipe, model: nn.Module, info: dict[str, Any]
                      ) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any], list[str]]:
    """The run's model as timm builds it from a config: (model, architecture, model_args, data config, notes)."""
    data_config, notes = dict(info["data_config"]), []
    inner = model
    if isinstance(model, InputBatchNorm):
        inner = model.model
        data_config["mean"], data_config["std"] = fold_input_bn(model.input_bn, data_config["mean"],
                                                                data_config["std"])
        notes.append("The official protocol's input BN (eval mode: a per-channel affine map of the pixels) is folded "
                     "into `pretrained_cfg`'s `mean` and `std`; the model expects pixels normalised by them, as "
                     "timm's transforms do.")
    architecture = timm_architecture(config)
    if config.cifar_stem:
        notes.append(f"`{architecture}` is timm's `{config.model}` with the CIFAR stem (3×3 stride-1 convolution, no "
                     f"max-pool), a timm model name that `import timm_bninit` registers.")
    base_cfg = get_pretrained_cfg(architecture)
    cfg = trained_cfg(base_cfg.to_dict() if base_cfg is not None else {"architecture": architecture},
                      {**info, "data_config": data_config})
    del cfg["label_names"]  # config.json keeps them at its top level, as timm writes them
    exported, model_args, built_notes = _timm_model(config, architecture, cfg, len(info["class_names"]))
    state = {key: value.contiguous() for key, value in inner.state_dict().items()}
    problems = weight_problems(exported, state)
    if problems:
        raise ExportError(f"timm.create_model({architecture!r}, **{model_args}) builds another architecture than the "
                          f"run's ({'; '.join(problems)}): timm's config cannot express this model; use the run "
                          f"through timm_bninit.load_run")
    exported.load_state_dict(state)
    return exported.eval(), architecture, model_args, data_config, notes + built_notes


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that holds anything but, with ``overwrite``, an earlier export."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder; choose a new folder for the export")
    held = {path.name for path in out_dir.iterdir()}
    if held and not overwrite:
        raise ExportError(f"{out_dir} is not empty; choose a new folder, or pass --overwrite to replace an earlier "
                          f"export there")
    if held - set(EXPORT_FILES):
        others = ", ".join(sorted(held - set(EXPORT_FILES))[:3])
        raise ExportError(f"{out_dir} holds files an export does not write ({others}); choose a new folder")


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "best", *,
               overwrite: bool = False, license_id: str | None = None, repo_id: str | None = None) -> Export:
    """Write ``out_dir``: the run's model as a timm model folder (``config.json``, ``model.safetensors``,
    ``README.md``), checked to load through ``timm.create_model("local-dir:...")`` to the run's outputs.

    Example::

        export = export_run("runs/demo/bn_gamma01-lr0.05-s1-20250101-120000", "exported/bn_gamma01-digits")
        model = timm.create_model(f"local-dir:{export.folder}", pretrained=True)

    Args:
        run_dir: A finished run directory.
        out_dir: A new or empty folder (with ``overwrite``: one an earlier export wrote).
        which: ``best`` (the best-validation epoch's weights) or ``last``.
        overwrite: Replace an earlier export in ``out_dir``.
        license_id: The model card's licence; None: the pretrained weights' (timm's cfg) or apache-2.0.
        repo_id: The hub repository the folder is for: the card's usage line loads ``hf-hub:<repo_id>`` instead of
            ``local-dir:<out_dir>``.

    Raises:
        ExportError: What timm's config cannot express, or an ``out_dir`` in use.
        RunError: The run is not finished, or its weights do not fit its recipe.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _prepare_folder(out_dir, overwrite)
    config, _, info = read_run_config(run_dir)
    model = load_run(run_dir, which)
    exported, architecture, model_args, data_config, notes = _build_exportable(config, model, info)
    export = Export(out_dir, architecture, model_args, list(info["class_names"]), notes)
    card = model_card(export, run_dir, which, model, license_id=license_id, repo_id=repo_id)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_for_hf(exported, str(staging), model_config={"label_names": export.label_names}, model_args=model_args,
                    safe_serialization=True, data_config=data_config)
        (staging / "README.md").write_text(card, encoding="utf-8")
        # the folder as a user loads it, against the model the run evaluated: nothing is written that loads otherwise
        try:
            loaded = timm.create_model(f"local-dir:{staging}", pretrained=True)
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            reason = " ".join(str(error).split())[:300]
            raise ExportError(f"the written folder does not load through timm.create_model(\"local-dir:...\") "
                              f"({reason}); timm's config cannot express this model: use timm_bninit.load_run"
                              ) from None
        export.max_output_difference = check_same_outputs(model, info["data_config"], loaded, data_config,
                                                          f'timm.create_model("local-dir:{out_dir}")')
        out_dir.mkdir(exist_ok=True)
        for file in EXPORT_FILES:
            os.replace(staging / file, out_dir / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export


# ---------------------------------------------------------------------------------------------------------------
# The model card


def _first_norm(model: nn.Module) -> nn.Module | None:
    """The network's first norm layer (the official input BN excluded: it is not the variant)."""
    network = model.model if isinstance(model, InputBatchNorm) else model
    return next((m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)


def _norm_lines(config: Recipe, model: nn.Module) -> list[str]:
    layer = _first_norm(model)
    options = layer.extra_repr().split(", ", 1)[-1] if layer is not None else ""  # without its channel count
    built = f"`{type(layer).__name__}({options})`" if layer is not None else "none"
    name = f"`{config.norm_layer}`" if config.norm_layer else "plain BatchNorm (BASE)"
    lines = [f"- **Norm layer:** {name}, every BN of the network: {built}"]
    if config.gamma_init is not None:
        lines.append(f"- **γ0 (recipe `gamma_init`):** {config.gamma_init:g} (initialisation only)")
    divisor = config.gamma_lr_div if config.gamma_lr_div is not None else getattr(layer, "gamma_lr_div", 1.0)
    source = "recipe `gamma_lr_div`" if config.gamma_lr_div is not None else "the norm layer's"
    lines.append(f"- **γ learning rate:** base / {divisor:g} ({source}; training only)")
    return lines


def _pretrained_text(config: Recipe) -> str:
    if config.pretrained_file:
        return f"the weights file `{config.pretrained_file}`, `bn_transfer: {config.bn_transfer}`"
    if config.pretrained:
        tag = config.pretrained if isinstance(config.pretrained, str) else config.model
        return f"timm's `{tag}`, `bn_transfer: {config.bn_transfer}`"
    return "none: trained from scratch (`bn_transfer` does not apply)"


def _card_license(config: Recipe, license_id: str | None) -> str:
    if license_id:
        return license_id
    if config.pretrained and not config.pretrained_file:  # weights derived from timm's: their licence
        cfg = get_pretrained_cfg(config.pretrained if isinstance(config.pretrained, str) else config.model)
        if cfg is not None and cfg.license:
            return cfg.license
    return DEFAULT_LICENSE


def _data_lines(final: dict[str, Any], num_classes: int) -> list[str]:
    data = final.get("data", {})
    revision = f", revision `{data['revision']}`" if data.get("revision") else ""
    splits = ", ".join(f"{split} {size:,}" for split, size in data.get("split_sizes", {}).items())
    return [f"- **Dataset:** {data.get('name', '?')} ({data.get('origin', '?')}: `{data.get('source', '?')}`"
            f"{revision}); splits: {splits}; {num_classes} classes"]


def _results(final: dict[str, Any], which: str) -> str:
    epoch = final.get("best_epoch") if which == "best" else final.get("epochs")
    selection = final.get("selection", "validation")
    rows = [("test accuracy at the best-validation epoch", final.get("test_acc_at_best_val")),
            (f"best {selection} accuracy", final.get("best_val_acc")),
            ("test accuracy at the last epoch", final.get("test_acc_last")),
            ("validation accuracy at the last epoch", final.get("val_acc_last"))]
    table = "\n".join(f"| {label} | {'n/a' if value is None else f'{value:.2f}'} |" for label, value in rows)
    kind = "best-validation" if which == "best" else "last"
    return (f"Top-1 accuracy (%) of the run. The weights here are the {kind} epoch's: epoch {epoch} of "
            f"{final.get('epochs')} (selected on {selection}).\n\n| | % |\n|---|---|\n{table}\n")


def _sweep_section(run_dir: Path, which: str) -> str | None:
    """The rows of the run's method (and the baseline) in its sweep's report, or None when the run is in no sweep."""
    out = run_dir.resolve().parents[2] if len(run_dir.resolve().parents) > 2 else None
    if out is None or not (out / layout.PLAN_FILE).is_file():
        return None
    entry = next((e for e in layout.read_plan(out) if (out / e["run_dir"]).resolve() == run_dir.resolve()), None)
    if entry is None:
        return None
    from .report import IncompleteSweepError, SweepTable, load_sweep, markdown, power_markdown, summarise

    metric = "best_val" if which == "best" else "last"
    intro = f"This run is seed {entry['seed']} of `{entry['method']}` at lr {entry['lr']:g} in the sweep `{out.name}`."
    try:
        tables = [t for t in summarise(load_sweep(out), metric=metric) if t.dataset == entry.get("dataset", "?")]
    except IncompleteSweepError as error:
        return f"{intro} Its report is not available: {str(error).splitlines()[0]}\n"
    table = tables[0]
    methods = list(dict.fromkeys([table.baseline, entry["method"]]))
    rows = SweepTable(table.dataset, table.metric, table.baseline, table.holm, methods, table.lrs,
                      {key: cell for key, cell in table.cells.items() if key[0] in methods})
    return f"{intro} Its method's row of the sweep's report:\n\n{markdown(rows)}\n{power_markdown(rows)}"


def model_card(export: Export, run_dir: Path, which: str, model: nn.Module, *, license_id: str | None = None,
               repo_id: str | None = None) -> str:
    """``README.md`` of an export, in the shape of timm's generated cards (YAML front matter with ``library_name:
    timm``, the licence, tags and hub data sets; the model's details; its use), with what a reader of a timm-bninit
    run needs: the variant and its parameters, ``bn_transfer``, the recipe, the data and its revision, the run's
    accuracies and, for a run of a sweep, its method's row of the sweep's report."""
    config, final, _ = read_run_config(run_dir)
    data = final.get("data", {})
    tags = ["image-classification", "timm", "timm-bninit", config.norm_layer or "batchnorm"]
    front = ["---", "tags:", *[f"- {tag}" for tag in tags], "library_name: timm",
             f"license: {_card_license(config, license_id)}"]
    if data.get("origin") == "hub":
        front += ["datasets:", f"- {data['source']}"]
    front += ["pipeline_tag: image-classification", "---"]
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{export.folder}"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    environment = final.get("environment", {})
    details = [f"- **Model type:** image classification, `{export.architecture}` (timm), {params:.2f} M parameters",
               *_norm_lines(config, model),
               f"- **Pretrained from:** {_pretrained_text(config)}",
               *([f"- **BN-only training:** γ and β only (classifier trained: {config.train_classifier})"]
                 if config.bn_only else []),
               *([f"- **Weights:** the EMA of the weights (decay {config.ema_decay:g})"] if config.ema else []),
               *_data_lines(final, len(export.label_names)),
               f"- **Image size:** {config.img_size} px (`{config.augmentation}` augmentation)",
               f"- **Recipe:** `{config.recipe}`, seed {config.seed}, {config.epochs} epochs (in full below)",
               f"- **Trained with:** timm-bninit {__version__}, timm {environment.get('timm')}, torch "
               f"{environment.get('torch')}, {environment.get('num_processes')} process(es)"]
    usage = (f'```python\nimport timm\nimport timm_bninit  # registers the norm layers (and the CIFAR-stem models)\n\n'
             f'model = timm.create_model("{source}", pretrained=True).eval()\n'
             f"transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))\n"
             f'names = model.pretrained_cfg["label_names"]\n```')
    imports = f"\n\nFirst import the recipe's own modules too: {', '.join(config.imports)}." if config.imports \
        else ""
    sections = ["\n".join(front), f"# Model card for {export.folder.resolve().name}",
                f"A timm `{config.model}` trained with timm-bninit's norm layer "
                f"`{config.norm_layer or 'batchnorm'}` on {data.get('name', config.dataset)}.",
                "## Model Details\n" + "\n".join(details),
                "## Model Usage\n" + usage + imports, "## Results\n" + _results(final, which)]
    sweep = _sweep_section(run_dir, which)
    if sweep:
        sections.append("## Sweep\n" + sweep)
    if export.notes:
        sections.append("## Export\n" + "\n".join(f"- {note}" for note in export.notes))
    recorded = yaml.safe_dump(layout.read_config(run_dir), sort_keys=True)
    sections.append(f"## Recipe\nThe run's resolved recipe (`{layout.CONFIG_FILE}`):\n\n```yaml\n{recorded}```")
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Sharing


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
         commit_message: str = "Add a model exported by timm-bninit") -> str:
    """Upload an export folder to the Hugging Face hub (``create_repo`` then ``upload_folder``); returns the commit's
    URL. The token is huggingface_hub's own: ``HF_TOKEN`` or a saved login.

    Raises:
        ExportError: The hub cannot be reached (offline, no network, ``HF_HUB_OFFLINE=1``), or refused the token or
            the repository.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi(library_name="timm-bninit", library_version=__version__)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message=commit_message)
    except Exception as error:  # whatever stops the upload (network, offline mode, token, rights)
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ExportError(f"could not push {folder} to the hub repository {repo_id!r} ({reason}); the export in "
                          f"{folder} is complete: push it again where the hub is reachable") from None
    return str(getattr(commit, "commit_url", commit))
