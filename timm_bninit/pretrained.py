"""Loading pretrained weights into a model with any norm variant, with a report of what happened to every tensor."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .convert import BNTransferWarning, check_bn_transfer, transfer_gamma
from .errors import STALE_STATISTICS, BNInitError
from .gammas import bn_gammas, gammaless_norms
from .norm import BatchNormVariant

__all__ = ["LoadReport", "PretrainedLoadError", "load_state_dict_file", "load_pretrained", "WEIGHT_SUFFIXES"]

_logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")


class PretrainedLoadError(BNInitError, ValueError):
    """A weights file that cannot be used; the message says what was wrong and what to do."""


@dataclass
class LoadReport:
    """What loading did with every tensor: nothing is dropped silently.

    Attributes:
        source: where the weights came from.
        loaded: model keys set from the source (γ under ``bn_transfer='scale'`` too, noted in ``transferred``).
        initialised: model keys not set from the source, each with how it was initialised.
        ignored: source keys the model did not take, each with why.
        transferred: BN γ keys the ``bn_transfer`` policy changed, with what it did.
    """

    source: str
    bn_transfer: str = "keep"
    loaded: list[str] = field(default_factory=list)
    initialised: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    transferred: dict[str, str] = field(default_factory=dict)

    def summary(self, max_items: int = 8) -> str:
        def listing(items: Mapping[str, str]) -> str:
            shown = [f"    {k}: {v}" for k, v in list(items.items())[:max_items]]
            if len(items) > max_items:
                shown.append(f"    ... and {len(items) - max_items} more")
            return "\n".join(shown)

        lines = [f"pretrained weights from {self.source} (bn_transfer={self.bn_transfer!r}): "
                 f"{len(self.loaded)} tensors loaded, {len(self.initialised)} initialised, "
                 f"{len(self.ignored)} ignored, {len(self.transferred)} γ changed by the policy"]
        for title, items in (("initialised", self.initialised), ("ignored", self.ignored),
                             ("changed by bn_transfer", self.transferred)):
            if items:
                lines += [f"  {title}:", listing(items)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "bn_transfer": self.bn_transfer, "loaded": list(self.loaded),
                "initialised": dict(self.initialised), "ignored": dict(self.ignored),
                "transferred": dict(self.transferred)}


def _unwrap(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    state = checkpoint
    for _ in range(3):  # training checkpoints nest the weights under a key or two
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not state:
        raise PretrainedLoadError(f"{path} does not hold a state dict (found {type(state).__name__}); save weights "
                                  f"with torch.save(model.state_dict(), path) or safetensors.torch.save_file")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PretrainedLoadError(f"{path} holds a mapping without tensors (keys: {', '.join(list(state)[:5])}, ...)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (.safetensors, .pth, .pt, .bin, .ckpt) into a CPU state dict.

    Training checkpoints that nest the weights (``{'state_dict': ...}``, ``{'model': ...}``) and DDP/compile prefixes
    (``module.``, ``_orig_mod.``) are unwrapped. Pickled files are read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"weights file {str(path)!r} does not exist; pass the path of a .safetensors, "
                                  f".pth or .bin file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise PretrainedLoadError(f"weights file {str(path)!r} has an unknown extension {suffix!r}; "
                                  f"supported: {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file: say which file, and why
        raise PretrainedLoadError(f"could not read weights file {str(path)!r}: {error}") from error
    return _unwrap(checkpoint, str(path))


def _bn_gamma_owners(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict key of every BN γ -> its module."""
    return {f"{name}.weight" if name else "weight": module for name, module, _ in bn_gammas(model)}


def _gammaless_keys(model: nn.Module) -> set[str]:
    """γ keys a standard BN checkpoint has for layers that have no γ (the blended-σ BN)."""
    return {f"{name}.weight" for name, _ in gammaless_norms(model)}


def _init_note(key: str, model: nn.Module) -> str:
    module_name, _, tensor_name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, BatchNormVariant) and tensor_name in module.extra_tensor_names:
        return f"{type(module).__name__} {tensor_name}: the variant's own init (not in a standard BN checkpoint)"
    return "not in the source: kept the model's own init"


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                    bn_transfer: str = "keep") -> LoadReport:
    """Load pretrained weights into ``model`` (any norm variant, any number of classes) and report every tensor.

    Tensors whose shape differs (a classifier for another number of classes) keep the model's init; tensors the
    model lacks are ignored; the variant's extra tensors keep their init; BN γ follows ``bn_transfer``.

    Args:
        model: the model to load into (in place).
        source: a weights file path, or a state dict.
        bn_transfer: ``keep`` | ``reset`` | ``scale`` for every BN γ (see :mod:`timm_bninit.convert`).

    Returns:
        A :class:`LoadReport`; its ``summary()`` is also logged.

    Example::

        report = load_pretrained(model, "resnet50_a1_in1k.safetensors", bn_transfer="keep")
    """
    check_bn_transfer(bn_transfer)
    if isinstance(source, Mapping):
        state, name = dict(source), "<state dict>"
    else:
        state, name = load_state_dict_file(source), str(source)
    report = LoadReport(source=name, bn_transfer=bn_transfer)
    target = model.state_dict()
    gamma_owners = _bn_gamma_owners(model)
    gammaless = _gammaless_keys(model)
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in target:
            report.ignored[key] = ("the layer has no γ (blended-σ BN)" if key in gammaless
                                   else "not in the model")
        elif tuple(tensor.shape) != tuple(target[key].shape):
            report.ignored[key] = f"shape {tuple(tensor.shape)} in the source, {tuple(target[key].shape)} in the model"
            report.initialised[key] = "shape differs from the source: kept the model's own init"
        elif key in gamma_owners:
            layer = gamma_owners[key]
            gamma = transfer_gamma(tensor, layer, bn_transfer)
            gamma_init = layer.gamma_init_value if isinstance(layer, BatchNormVariant) else 1.0
            if gamma is None:
                shown = "U(0,1)" if gamma_init is None else f"{gamma_init:g}"
                report.initialised[key] = f"bn_transfer='reset': the layer's initial γ ({shown})"
                report.transferred[key] = "reset"
            else:
                to_load[key] = gamma
                report.loaded.append(key)
                if bn_transfer == "scale":
                    report.transferred[key] = f"scaled by γ0={gamma_init:g}"
        else:
            to_load[key] = tensor
            report.loaded.append(key)
    for key in target:
        if key not in state and key not in report.initialised:
            report.initialised[key] = _init_note(key, model)
    if not report.loaded and not report.transferred:
        raise PretrainedLoadError(f"no tensor of {name} fits the model: its keys ({', '.join(list(state)[:3])}, "
                                  f"...) are not the model's ({', '.join(list(target)[:3])}, ...); was it saved from "
                                  f"another architecture (cifar_stem, input_bn, another model)?")
    _, unexpected = model.load_state_dict(to_load, strict=False)
    assert not unexpected, f"internal error: unexpected keys {unexpected}"  # every key was matched above
    changed = [k for k, v in report.transferred.items() if v != "scaled by γ0=1"]
    if changed:
        warnings.warn(STALE_STATISTICS.format(policy=bn_transfer, count=len(changed), extra=""), BNTransferWarning,
                      stacklevel=2)
    _logger.info(report.summary())
    return report
