"""The CIFAR stem, and timm model names for the ResNets that carry it: ``resnet18_cifar_stem`` is timm's resnet18 with
a 3×3 stride-1 stem convolution and no max-pool (the paper's CIFAR ResNets, docs/methods.md §1).

timm's ResNet has no such stem (its stems are a 7×7 stride-2 convolution or a deep 3-conv stem, always followed by a
stride-2 pool), so a model trained with it cannot be named by a timm architecture plus keyword arguments. Registering
a timm model per base ResNet through timm's own ``register_model`` lets ``timm.create_model("resnet18_cifar_stem",
norm_layer=..., num_classes=...)`` build it, and so lets a shared ``config.json`` name it as its ``architecture``:
``timm.create_model("local-dir:...")`` then loads it once ``import timm_bninit`` has registered the names.

Example::

    import timm, timm_bninit
    model = timm.create_model("resnet18_cifar_stem", norm_layer="bn_gamma01", num_classes=10)
"""

from __future__ import annotations

import functools
from typing import Any

import timm
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model
from torch import nn

from .errors import RecipeError

__all__ = ["CIFAR_STEM_BASES", "apply_cifar_stem", "cifar_stem_name", "register_cifar_stem_model"]

# The paper's ResNet depths (docs/methods.md §1, §7); any other timm ResNet with a single-conv stem registers with
# register_cifar_stem_model
CIFAR_STEM_BASES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_SUFFIX = "_cifar_stem"

# read by timm's register_model: a model name's pretrained cfg (no weights; the CIFAR input size)
default_cfgs: dict[str, dict[str, Any]] = {}


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a ResNet's stem convolution and max-pool by a 3×3 stride-1 convolution (kaiming-normal, fan_in) and
    nothing; returns the model. Draws from torch's global generator (scope it to make the draw reproducible)."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and isinstance(model.conv1, nn.Conv2d)):
        raise RecipeError(f"cifar_stem applies to timm ResNets with a single-conv stem; {type(model).__name__} has "
                          f"none (use a resnet* model or cifar_stem=false)")
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_in", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def cifar_stem_name(base: str) -> str:
    """The timm model name of ``base`` with the CIFAR stem: ``resnet18`` -> ``resnet18_cifar_stem``."""
    return base + _SUFFIX


def _build(base: str, **kwargs: Any) -> nn.Module:
    return apply_cifar_stem(timm.create_model(base, **kwargs))


def register_cifar_stem_model(base: str) -> str:
    """Register ``<base>_cifar_stem`` with timm: ``base`` built by timm with the CIFAR stem; returns the name.

    The model builds through timm's ``build_model_with_cfg``, so ``pretrained=True`` with a ``local-dir:`` or
    ``hf-hub:`` source loads a saved state dict into it as into any timm model. ``base`` must be a timm ResNet with a
    single-conv stem (the check runs when the model is built).
    """
    name = cifar_stem_name(base)
    source = get_pretrained_cfg(base)
    shared = {} if source is None else {key: getattr(source, key) for key in
                                        ("mean", "std", "interpolation", "first_conv", "classifier")}
    # 32 px in, stride 8 through the stages: a 4×4 map at the pool (no stem or max-pool downsampling)
    default_cfgs[name] = {**shared, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0,
                          "architecture": name}

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_model_with_cfg(functools.partial(_build, base), name, pretrained, **kwargs)

    # timm registers an entrypoint under its __name__, from the module it names
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm's {base} with a 3×3 stride-1 stem convolution and no max-pool (CIFAR ResNets)."
    globals()[name] = entrypoint  # register_model lists the name in this module's __all__: it must exist here
    register_model(entrypoint)
    return name


def _register_builtin() -> None:
    for base in CIFAR_STEM_BASES:
        register_cifar_stem_model(base)
