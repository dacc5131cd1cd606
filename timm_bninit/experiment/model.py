"""The model a run starts from: the variant, pretrained weights, and the shared-weight initialisation of the seed."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import timm
import torch
from torch import nn

from ..cifar_stem import apply_cifar_stem
from ..convert import BNTransferWarning
from ..factory import create_model
from ..gammas import bn_gammas
from ..pretrained import load_pretrained
from ..registry import get_norm_layer
from .protocol import apply_protocol
from .recipe import Recipe
from .seeding import rng_scope, seed_for

__all__ = ["build_model", "cifar_stem"]


def build_model(config: Recipe, num_classes: int) -> nn.Module:
    """The model with its variant, pretrained weights and a shared-weight initialisation drawn from the run seed.

    Every tensor that is not part of a norm layer is initialised from a plain-BN model built under the seed's
    ``init`` stream, so two methods with the same seed start from identical convolution and classifier weights
    whatever random numbers their own layers consume (``bn_uniform`` draws γ). Plain BN is built once, as that
    reference itself.
    """
    kwargs = {"num_classes": num_classes, "drop_rate": config.drop_rate}
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if config.zero_init_last:
        kwargs["zero_init_last"] = True
    # Plain BN (BASE) is the reference: the same timm call under the same stream draws the same numbers, and its
    # norm tensors draw none, so its copy of the shared tensors would change nothing; build it once, not twice.
    plain = config.norm_layer is None
    reference = None
    if not plain:
        with rng_scope(seed_for(config.seed, "init")):
            reference = timm.create_model(config.model, **kwargs)
    pretrained = False if config.pretrained_file else config.pretrained
    norm_layer = config.norm_layer
    if config.gamma_init is not None:
        norm_layer = functools.partial(get_norm_layer(norm_layer), gamma_init=config.gamma_init)
    with rng_scope(seed_for(config.seed, "init" if plain else "init-method")), _transfer_warnings(config):
        model = create_model(config.model, norm_layer, pretrained=pretrained, bn_transfer=config.bn_transfer,
                             **kwargs)
    if plain and not (pretrained or config.pretrained_file or config.zero_init_last):
        # BASE is the same network with γ0 = 1 on every BN: undo timm ResNets' zeroed last-BN γ (docs/methods.md §9)
        with torch.no_grad():
            for _, _, gamma in bn_gammas(model):
                gamma.fill_(1.0)
    if config.cifar_stem:
        model = cifar_stem(model, seed_for(config.seed, "init-stem"))
    if reference is not None:
        reference = cifar_stem(reference, seed_for(config.seed, "init-stem")) if config.cifar_stem else reference
        report = getattr(model, "bninit_load_report", None)
        # with pretrained weights only what they did not provide (the new classifier) comes from the shared init
        _copy_shared_weights(reference, model, only=None if report is None else set(report.initialised))
    model = apply_protocol(model, config)  # the official init and the input BN, when the recipe asks
    # a weights file loads into the finished architecture (CIFAR stem, input BN), whose keys and shapes it has; what
    # it does not provide (a new classifier) keeps the shared init
    if config.pretrained_file:
        with _transfer_warnings(config):
            model.bninit_load_report = load_pretrained(model, config.pretrained_file, config.bn_transfer)
    return model


@contextlib.contextmanager
def _transfer_warnings(config: Recipe) -> Iterator[None]:
    """Silence the stale-statistics warning of a γ-changing ``bn_transfer`` when the run re-estimates BN statistics
    before every evaluation anyway."""
    with warnings.catch_warnings():
        if config.precise_bn_batches:
            warnings.simplefilter("ignore", BNTransferWarning)
        yield


def cifar_stem(model: nn.Module, seed: int) -> nn.Module:
    """Replace a ResNet's 7×7 stride-2 stem and max-pool by a 3×3 stride-1 convolution (CIFAR ResNets), drawn from
    ``seed``; the surgery is the plugin's (``timm_bninit.cifar_stem``), which also names these models for timm."""
    with rng_scope(seed):
        return apply_cifar_stem(model)


def _is_norm_tensor(model: nn.Module, key: str) -> bool:
    module_name = key.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def _copy_shared_weights(reference: nn.Module, model: nn.Module, only: set[str] | None = None) -> None:
    target = model.state_dict()
    for key, tensor in reference.state_dict().items():
        if only is not None and key not in only:
            continue
        if key in target and target[key].shape == tensor.shape and not _is_norm_tensor(model, key):
            target[key].copy_(tensor)
