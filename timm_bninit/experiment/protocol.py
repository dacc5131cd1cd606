"""Davis & Frank's official from-scratch protocol on the model side: its init, its input BN, a per-class train subset.

The recipe side (which keys ``protocol: official`` pins) is :data:`timm_bninit.experiment.recipe.OFFICIAL_PROTOCOL`.
Facts from the official code, ``osu-cvl/revisiting-bn-init`` at commit 8ff3592 (``networks.py``): every conv
kaiming-normal with fan_in for ReLU; every linear weight PyTorch's default (kaiming-uniform, a = √5); every bias zero,
the classifier's and every BN β included; every BN γ = γ0, the last BN of each block too; optionally a BN over the
input channels in front of the network, on [0, 1] pixels, with γ = 0.58·γ0 and β frozen at 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..gammas import bn_gammas
from ..norm import BatchNormGamma2d
from .recipe import Recipe
from .seeding import rng_scope, seed_for

__all__ = ["INPUT_BN_SIGMA", "apply_protocol", "apply_official_init", "InputBatchNorm", "train_per_class_subset"]

INPUT_BN_SIGMA = 0.58  # std of ReLU(z), z ~ N(0, 1): the official input BN starts at γ0 × this (its σ_act)


def apply_protocol(model: nn.Module, config: Recipe) -> nn.Module:
    """``model`` with the recipe's ``protocol`` init and ``input_bn`` applied; returns the (possibly wrapped) root.

    Called by ``build_model`` after the shared weights are in place. The official init draws from the seed's
    ``init-official`` stream and only for convolutions and linear layers outside norm layers, which every method of
    a seed has alike: within a seed every non-norm tensor stays identical across methods.
    """
    if config.protocol == "official":
        apply_official_init(model, seed_for(config.seed, "init-official"))
    if config.input_bn:
        model = InputBatchNorm(model)
    return model


def _norm_children(model: nn.Module) -> set[int]:
    """Ids of every module inside a norm layer (a variant's own sub-modules are the method's, not shared)."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            inside.update(id(child) for child in module.modules())
    return inside


@torch.no_grad()
def apply_official_init(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``model`` in place as the official code does, drawing from ``seed``; returns it.

    Convolutions: kaiming-normal, fan_in, ReLU gain (std √(2 / fan_in)); timm and torchvision use fan_out.
    Linear weights: PyTorch's default (kaiming-uniform with a = √5, i.e. U(±1/√fan_in)). Every ``bias`` Parameter
    (conv, linear, BN β) zero. BN γ is left as the layer set it: γ0 of the variant (1 for plain BN), which with
    ``zero_init_last=False`` holds for every BN.

    Example::

        apply_official_init(timm.create_model("resnet18", zero_init_last=False), seed=1)
    """
    inside_norm = _norm_children(model)
    with rng_scope(seed):
        for module in model.modules():
            if id(module) in inside_norm:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.zero_()
    return model


def _gamma0_and_div(model: nn.Module) -> tuple[float, float]:
    """γ0 and the γ learning-rate divisor c of the network's BN layers (plain BN: 1 and 1)."""
    for _, module, _ in bn_gammas(model):
        return float(getattr(module, "gamma_init", 1.0)), float(getattr(module, "gamma_lr_div", 1.0))
    return 1.0, 1.0


class InputBatchNorm(nn.Module):
    """``model`` behind a BatchNorm over the input channels: the official code's input normalisation.

    The images reach it as [0, 1] pixels (no mean/std normalisation). Its γ starts at 0.58·γ0 (γ0 and c those of
    the network's BN layers) and trains in the γ group at lr / c. Its β is frozen at 0 by having none
    (``bias = None``, which BatchNorm reads as a zero shift): a Parameter with ``requires_grad=False`` would be
    trained again by BN-only training (``freeze_all_but_norm`` unfreezes every BN parameter), and a zero buffer
    cannot pass ``convert_sync_batchnorm``. Every other attribute (``get_classifier``, ``pretrained_cfg``, ...) is
    the wrapped model's. State-dict keys gain the prefix ``model.``.

    Example::

        model = InputBatchNorm(timm.create_model("resnet18", norm_layer="bn_gamma01", zero_init_last=False))
    """

    def __init__(self, model: nn.Module, in_chans: int | None = None):
        super().__init__()
        gamma0, gamma_lr_div = _gamma0_and_div(model)
        in_chans = in_chans or int(getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0])
        self.input_bn = BatchNormGamma2d(in_chans, gamma_init=INPUT_BN_SIGMA * gamma0, gamma_lr_div=gamma_lr_div)
        self.input_bn.bias = None  # β frozen at 0 (see above)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_bn(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.input_bn(x))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not built yet
                raise
            return getattr(self.model, name)


def train_per_class_subset(rows: Any, per_class: int, split_seed: int) -> Any:
    """The first ``per_class`` rows of each class of a ``datasets`` split, in an order drawn with ``split_seed``.

    Applied to train after the validation split is drawn, so validation and test are untouched; the order depends
    on the split seed only, so every run seed and method trains on the same images. A class with fewer images keeps
    them all. Rows keep their original order.
    """
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed_for(split_seed, "train-per-class")))
    labels, kept, counts = rows["label"], [], {}
    for index in order.tolist():
        label = labels[index]
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            kept.append(index)
    return rows.select(sorted(kept))
