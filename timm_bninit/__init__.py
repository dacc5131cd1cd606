"""timm-bninit: batch-normalisation variants for timm, registered under string names on import.

Example::

    import timm, timm_bninit
    model = timm.create_model("resnet50", norm_layer="bn_gamma01", zero_init_last=False)
"""

from . import norm as norm
from .norm import *  # noqa: F403
from .registry import (
    UnknownNormLayerError,
    _register_builtin,
    get_norm_act_layer,
    get_norm_layer,
    list_norm_layers,
    register_norm_layer,
)

_register_builtin()
del _register_builtin

__version__ = "0.1.0"

__all__ = [
    *norm.__all__,
    "UnknownNormLayerError",
    "get_norm_act_layer",
    "get_norm_layer",
    "list_norm_layers",
    "register_norm_layer",
]
