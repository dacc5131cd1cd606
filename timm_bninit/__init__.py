"""timm-bninit: batch-normalisation variants for timm, registered under string names on import.

Example::

    import timm, timm_bninit
    model = timm.create_model("resnet50", norm_layer="bn_gamma01", zero_init_last=False)

From the experiment engine, loaded on first use: ``timm_bninit.build_training(recipe, **overrides)`` returns the
model, optimizer and scheduler a run of a recipe starts with, and ``timm_bninit.load_run(run_dir)`` the trained model
a finished run evaluated.
"""

from . import norm as norm
from .cifar_stem import CIFAR_STEM_BASES, apply_cifar_stem, cifar_stem_name, register_cifar_stem_model
from .cifar_stem import _register_builtin as _register_cifar_stem_models
from .convert import BN_TRANSFER_POLICIES, BNTransferWarning, UnknownPolicyError, convert_norm, recalibrate_bn_stats
from .errors import BNInitError
from .factory import create_model, reapply_norm_init
from .gammas import bn_gammas
from .norm import *  # noqa: F403
from .optim import param_group_fn, param_groups
from .pretrained import LoadReport, PretrainedLoadError, load_pretrained, load_state_dict_file
from .registry import (
    UnknownNormLayerError,
    _register_builtin,
    get_norm_act_layer,
    get_norm_layer,
    list_norm_layers,
    register_norm_layer,
)
from .sync import SyncBatchNormGamma, SyncBatchNormGammaAct, VariantSyncError, convert_sync_batchnorm
from .sync import install_sync_guards as _install_sync_guards

_register_builtin()
_register_cifar_stem_models()
_install_sync_guards()
del _register_builtin, _register_cifar_stem_models, _install_sync_guards

__version__ = "0.1.0"


def __getattr__(name: str):
    # the experiment engine (accelerate, datasets) loads only when asked for: `import timm_bninit` stays the plugin.
    # These are the plugin floor's imports of the engine, allowed as its front doors (tests/test_import_floors.py)
    if name == "build_training":
        from .experiment.train import build_training

        return build_training
    if name == "load_run":
        from .experiment.trained import load_run

        return load_run
    if name == "VARIANT_TYPES":  # each registered layer class -> its fused twin, read from the registry when asked
        from .registry import variant_types

        return variant_types()
    raise AttributeError(f"module 'timm_bninit' has no attribute {name!r}")


__all__ = [
    *norm.__all__,
    "BNInitError",
    "BNTransferWarning",
    "CIFAR_STEM_BASES",
    "BN_TRANSFER_POLICIES",
    "LoadReport",
    "PretrainedLoadError",
    "SyncBatchNormGamma",
    "SyncBatchNormGammaAct",
    "UnknownNormLayerError",
    "VariantSyncError",
    "UnknownPolicyError",
    "apply_cifar_stem",
    "bn_gammas",
    "cifar_stem_name",
    "convert_norm",
    "convert_sync_batchnorm",
    "create_model",
    "get_norm_act_layer",
    "get_norm_layer",
    "list_norm_layers",
    "load_pretrained",
    "load_state_dict_file",
    "param_group_fn",
    "param_groups",
    "reapply_norm_init",
    "recalibrate_bn_stats",
    "register_cifar_stem_model",
    "register_norm_layer",
]
