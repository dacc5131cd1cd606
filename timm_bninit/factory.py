"""``create_model``: a timm model with a norm variant on every BN layer, in every family, optionally pretrained."""

from __future__ import annotations

import logging
import os
from typing import Any

import timm
import torch
from torch import nn

from .convert import check_bn_transfer, convert_norm
from .errors import BNInitValueError
from .norm import BatchNormVariant
from .pretrained import LoadReport, PretrainedLoadError, load_pretrained
from .registry import LayerFactory

__all__ = ["create_model", "reapply_norm_init"]

_logger = logging.getLogger(__name__)


def reapply_norm_init(model: nn.Module, keep_zero_gamma: bool = False) -> int:
    """Re-apply each variant layer's own initialisation to γ, β and its extra parameters.

    Model families' own init code (efficientnet, resnetv2, byobnet, densenet, vgg, ...) resets BN γ to 1 after the
    layers were built; this undoes that. Running statistics are untouched.

    Args:
        model: the model.
        keep_zero_gamma: leave γ that the model zeroed (ResNet's ``zero_init_last=True``) at zero.

    Returns:
        The number of layers re-initialised.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BatchNormVariant):
            zeroed = (keep_zero_gamma and isinstance(module.weight, nn.Parameter)
                      and not torch.count_nonzero(module.weight))
            module.reset_affine_parameters()
            if zeroed:
                with torch.no_grad():
                    module.weight.zero_()
            count += 1
    return count


def _create_with_norm(model_name: str, norm_layer: str | LayerFactory | None, kwargs: dict[str, Any]) -> nn.Module:
    if norm_layer is None:
        return timm.create_model(model_name, **kwargs)
    try:
        return timm.create_model(model_name, norm_layer=norm_layer, **kwargs)
    except TypeError as error:
        if "norm_layer" not in str(error):
            raise
    # families that reject norm_layer= (mobilenetv3, vgg*_bn, dla, rexnet): build plain, then patch
    _logger.info("%s does not take norm_layer=; converting its BatchNorm layers instead", model_name)
    return timm.create_model(model_name, **kwargs)


def create_model(model_name: str, norm_layer: str | LayerFactory | None = None, *,
                 pretrained: bool | str = False, pretrained_file: str | os.PathLike | None = None,
                 bn_transfer: str = "keep", **kwargs: Any) -> nn.Module:
    """Create a timm model whose every BN layer is ``norm_layer``, initialised as the variant specifies.

    Unlike ``timm.create_model(name, norm_layer=...)``, this works in every family (those that reject
    ``norm_layer=`` are patched with :func:`~timm_bninit.convert_norm`), re-applies the variant's γ0 after families
    whose own init resets γ to 1, and gives γ0 to the last BN of every residual block too (the paper's init)
    unless ``zero_init_last=True`` is passed explicitly.

    Args:
        model_name: a timm model name.
        norm_layer: a registered name (``'bn_gamma01'``) or a layer class / partial; ``None`` keeps plain BN.
        pretrained: ``True`` for the model's default timm hub weights, or a hub tag (``'resnet50.a1_in1k'``).
        pretrained_file: a local weights file (.safetensors, .pth, .bin); used instead of the hub.
        bn_transfer: what a pretrained γ becomes: ``keep`` | ``reset`` | ``scale``.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``features_only``, ``drop_rate``, ...).

    Returns:
        The model; with pretrained weights, its :class:`~timm_bninit.LoadReport` is ``model.bninit_load_report``.

    Example::

        model = timm_bninit.create_model("resnet50", "bn_gamma01", pretrained_file="resnet50.safetensors",
                                         num_classes=200, bn_transfer="keep")
    """
    check_bn_transfer(bn_transfer)
    if pretrained and pretrained_file is not None:
        raise BNInitValueError("pass either pretrained (hub weights) or pretrained_file (a local file), not both")
    keep_zero_gamma = bool(kwargs.get("zero_init_last", False))
    hub_kwargs = {k: kwargs.pop(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir") if k in kwargs}
    model = _create_with_norm(model_name, norm_layer, kwargs)
    if norm_layer is not None:
        convert_norm(model, norm_layer, "reset", only_plain=True)  # BN that the family built regardless
        reapply_norm_init(model, keep_zero_gamma=keep_zero_gamma)

    report: LoadReport | None = None
    if pretrained_file is not None:
        report = load_pretrained(model, pretrained_file, bn_transfer=bn_transfer)
    elif pretrained:
        hub_name = pretrained if isinstance(pretrained, str) else model_name
        source_kwargs = {k: v for k, v in kwargs.items() if k in ("in_chans", "features_only", "out_indices")}
        try:
            source = timm.create_model(hub_name, pretrained=True, **source_kwargs, **hub_kwargs)
        except Exception as error:  # offline, unknown tag, hub error: say what to do instead
            raise PretrainedLoadError(f"could not fetch pretrained weights for {hub_name!r} from the timm hub "
                                      f"({error}); without network access pass a local weights file: "
                                      f"pretrained_file=PATH") from error
        report = load_pretrained(model, source.state_dict(), bn_transfer=bn_transfer)
        cfg = getattr(source, "pretrained_cfg", None) or {}
        report.source = f"timm pretrained {cfg.get('file') or cfg.get('hf_hub_id') or hub_name}"
        model.pretrained_cfg = getattr(source, "pretrained_cfg", getattr(model, "pretrained_cfg", None))
    if report is not None:
        model.bninit_load_report = report
    return model
