"""Batch-normalisation variants as drop-in ``nn.BatchNorm2d`` subclasses.

Every layer here subclasses ``nn.BatchNorm2d`` so that pretrained state-dict keys keep matching, and accepts
``device``/``dtype`` like any torch layer. Formulas are per channel and follow ``docs/methods.md``:

* :class:`BatchNormGamma2d`: ordinary BN whose γ starts at γ0 < 1 and whose γ learning rate is divided by
  ``gamma_lr_div`` (Davis & Frank, §1). At run time it *is* plain BN.
* :class:`BatchNormUniformGamma2d`: γ ~ U(0, 1), β = 0 (Frankle et al., §5).
* :class:`RepresentativeBatchNorm2d`: RBN with centering and scaling calibration (Gao et al., §2).
* :class:`InstanceEnhancementBatchNorm2d`: IEBN (Liang et al., §3).
* :class:`BlendedStdBatchNorm2d`: BN without γ, σ blended with the previous batch's (§4).

The calibrating layers (RBN, IEBN, blend) never materialise the normalised tensor: they need only the per-(sample,
channel) mean m and variance v of the input, from which the whole layer reduces to ``y = (x − m)·A[n, c] + B[n, c]``
with small (N, C) tensors A and B; the kernels that apply it live beside this file in :mod:`timm_bninit.norm_kernels`.
A new calibrating variant subclasses :class:`CalibratedBatchNorm2d` and writes only the forward coefficients; it
trains through autograd, and the built-in ones' hand-written backward is an optimisation tested against that path.

Every plain layer has a fused norm+act twin (:func:`norm_act_type`): the built-in ones by name, below; a subclass of
any of them gets one derived by inheritance, so that one ``register_norm_layer`` call is all a new variant needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn

from . import native_kernels
from .errors import BNInitValueError
from .norm_kernels import (
    NativeStepFunction,
    PlaneAffineFunction,
    all_gather_moments,
    all_reduce_sum,
    plane,
    plane_affine,
    read_state,
)

__all__ = [
    "BatchNormVariant",
    "BatchNormGamma2d",
    "BatchNormGammaAct2d",
    "BatchNormUniformGamma2d",
    "BatchNormUniformGammaAct2d",
    "RepresentativeBatchNorm2d",
    "RepresentativeBatchNormAct2d",
    "InstanceEnhancementBatchNorm2d",
    "InstanceEnhancementBatchNormAct2d",
    "BlendedStdBatchNorm2d",
    "BlendedStdBatchNormAct2d",
    "CalibratedBatchNorm2d",
    "norm_act_type",
]


class BatchNormVariant:
    """Behaviour shared by every timm-bninit norm layer (a mixin placed before ``nn.BatchNorm2d``).

    Attributes:
        gamma_lr_div: divisor of γ's (``weight``'s) learning rate, read by :func:`timm_bninit.param_groups`
            (``c`` in Davis & Frank). 1 means γ trains at the base learning rate.
        extra_tensor_names: names of the per-channel ``(C,)`` tensors this layer adds to a standard BN state dict.
        plain_bn_forward: the forward pass is ``nn.BatchNorm2d``'s (only the initialisation and γ's learning rate
            differ), so :func:`timm_bninit.convert_sync_batchnorm` may make the layer a ``SyncBatchNormGamma``.
            Calibrating layers (:class:`CalibratedBatchNorm2d`) synchronise their own statistics instead; a variant
            that is neither cannot be synchronised.
    """

    gamma_lr_div: float = 1.0
    extra_tensor_names: tuple[str, ...] = ()
    plain_bn_forward: bool = False

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self.reset_affine_parameters()

    def reset_affine_parameters(self) -> None:
        """Re-apply the variant's initialisation to γ, β and its extra tensors (running statistics untouched).

        Used after model families whose own init resets every BN γ to 1.
        """
        with torch.no_grad():
            if self.weight is not None:
                self._init_gamma(self.weight)
            if self.bias is not None:
                self.bias.zero_()
            self._reset_extra_tensors()

    @property
    def gamma_init_value(self) -> float | None:
        """γ0 as a number when the variant has one (used by the ``reset``/``scale`` transfer policies)."""
        return 1.0

    def _init_gamma(self, weight: torch.Tensor) -> None:
        weight.fill_(1.0)

    def _reset_extra_tensors(self) -> None:
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A standard BN checkpoint lacks the variant's extra tensors: keep their current (initial) values so that
        # strict loading of plain-BN weights works.
        for name in self.extra_tensor_names:
            tensor = getattr(self, name, None)
            if tensor is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = tensor.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# The built-in layers' fused twins, declared beside each one (a built-in keeps its own twin class and name).
_DECLARED_TWINS: dict[type[nn.BatchNorm2d], type[BatchNormAct2d]] = {}


def _fused_twin_of(plain: type[nn.BatchNorm2d]) -> Callable[[type[BatchNormAct2d]], type[BatchNormAct2d]]:
    """Class decorator: the decorated norm+act class is ``plain``'s fused twin."""
    def declare(fused: type[BatchNormAct2d]) -> type[BatchNormAct2d]:
        _DECLARED_TWINS[plain] = fused
        return fused
    return declare


# --------------------------------------------------------------------------------------------------------------
# γ-initialisation variants: plain BN at run time.


class _GammaInitBase(BatchNormVariant):
    plain_bn_forward = True

    def __init__(self, num_features: int, *args, gamma_init: float = 0.1, gamma_lr_div: float = 100.0, **kwargs):
        if not gamma_lr_div > 0:
            raise BNInitValueError(f"gamma_lr_div must be > 0 (the γ learning rate is base_lr / gamma_lr_div), "
                             f"got {gamma_lr_div}")
        self.gamma_init = float(gamma_init)
        self.gamma_lr_div = float(gamma_lr_div)
        super().__init__(num_features, *args, **kwargs)

    @property
    def gamma_init_value(self) -> float | None:
        return self.gamma_init

    def _init_gamma(self, weight: torch.Tensor) -> None:
        weight.fill_(self.gamma_init)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma_init={self.gamma_init:g}, gamma_lr_div={self.gamma_lr_div:g}"


class BatchNormGamma2d(_GammaInitBase, nn.BatchNorm2d):
    """BatchNorm with γ = γ0 (``gamma_init``), β = 0, and γ learning rate base / ``gamma_lr_div``.

    Davis & Frank's method: γ0 = 0.1 and c = 100 are the recommended values. The forward pass is ordinary BN; the
    learning-rate part takes effect through :func:`timm_bninit.param_groups`.
    """


@_fused_twin_of(BatchNormGamma2d)
class BatchNormGammaAct2d(_GammaInitBase, BatchNormAct2d):
    """:class:`BatchNormGamma2d` fused with timm's activation (for the families built through norm+act layers)."""


class _UniformGammaBase(BatchNormVariant):
    plain_bn_forward = True

    @property
    def gamma_init_value(self) -> float | None:
        return None  # random: there is no single γ0

    def _init_gamma(self, weight: torch.Tensor) -> None:
        weight.uniform_(0.0, 1.0)


class BatchNormUniformGamma2d(_UniformGammaBase, nn.BatchNorm2d):
    """BatchNorm with γ ~ U(0, 1) and β = 0 (PyTorch's pre-1.2 default; Frankle, Schwab & Morcos)."""


@_fused_twin_of(BatchNormUniformGamma2d)
class BatchNormUniformGammaAct2d(_UniformGammaBase, BatchNormAct2d):
    """:class:`BatchNormUniformGamma2d` fused with timm's activation."""


# --------------------------------------------------------------------------------------------------------------
# Calibrating variants: own forward, computed from per-(sample, channel) statistics.


def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise BNInitValueError(f"{type(layer).__name__} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != layer.num_features:
        raise BNInitValueError(f"{type(layer).__name__} was built for {layer.num_features} channels but the input has "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")


class _BatchMoments(NamedTuple):
    """A training batch's per-channel statistics, as the backward pass needs them."""

    mean: torch.Tensor  # μ (C,)
    var: torch.Tensor  # biased σ² (C,)
    centered_mean: torch.Tensor  # m − μ per plane (N, C)
    count: int  # values per channel in the (global) batch
    plane_weight: float  # each local plane's share of the (global) batch: H·W / count
    group: dist.ProcessGroup | None  # the processes μ and σ² were synchronised over, None for local statistics


class _CalibratedBase(BatchNormVariant):
    """Forward machinery shared by RBN, IEBN, the blended-σ layer and any calibrating variant built on
    :class:`CalibratedBatchNorm2d`.

    A variant writes the forward coefficients only: :meth:`_calibration_params`, :meth:`_batch_coefficients` (which
    takes its batch statistics from :meth:`_batch_mean_var`, so that they synchronise and feed the running
    statistics) and :meth:`_normalize_with_running_stats`. It then trains through plain autograd: differentiable
    per-plane moments → coefficients → ``x·A + B'``. A class that also writes :meth:`_batch_coefficients_backward`
    trains through :class:`~timm_bninit.norm_kernels.PlaneAffineFunction` instead, the same computation with a
    closed-form backward (the built-in layers, for speed); the tests check one against the other.

    Attributes:
        sync_batch_stats: in training, compute the batch statistics (μ, σ² per channel) over the batches of every
            process of ``process_group`` (torch.distributed's default group when None), as ``nn.SyncBatchNorm``
            does; set by :func:`timm_bninit.convert_sync_batchnorm`. The per-sample calibrations stay per sample.
            A flag on the same class, not a subclass, so that state-dict keys, ``isinstance`` checks and the
            registry's plain/Act pairing are the same for synchronised layers.
        process_group: see ``sync_batch_stats``.
        force_autograd: train through plain autograd even though the class has a hand-written backward. Set it on
            a layer (``layer.force_autograd = True``) or a class, e.g. to check the fused backward against autograd
            or to develop a variant from a built-in one; it changes speed, not results (up to rounding).
    """

    sync_batch_stats: bool = False
    process_group: dist.ProcessGroup | None = None
    force_autograd: bool = False

    def _stats_dtype(self, x: torch.Tensor) -> torch.dtype:
        # statistics in at least float32 (as BN does under mixed precision); float64 stays float64 for gradcheck
        return torch.promote_types(x.dtype, torch.float32)

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _momentum_factor(self) -> float | torch.Tensor:
        """The running-statistics update factor as ``nn.BatchNorm2d`` computes it (1/n as a tensor, not a Python
        float: no data-dependent Python under torch.compile)."""
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        return 0.0 if self.momentum is None else self.momentum

    def _sync_group(self) -> dist.ProcessGroup | None:
        """The process group whose batches make up this training step's batch statistics, or None (local)."""
        if not (self.sync_batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _batch_mean_var(self, mean_nc: torch.Tensor, var_nc: torch.Tensor, plane_size: int) -> _BatchMoments:
        """Per-channel batch mean μ and biased variance σ² from per-(sample, channel) ones over equal-sized planes
        (law of total variance), over every process's batch when synchronised."""
        mean = mean_nc.mean(0)
        centered_mean = mean_nc - mean
        var = torch.addcmul(var_nc, centered_mean, centered_mean).mean(0)
        count = mean_nc.shape[0] * plane_size
        group = self._sync_group()
        if group is not None:
            mean, var, count = all_gather_moments(mean, var, count, group)
            centered_mean = mean_nc - mean
            if count <= 1:
                raise BNInitValueError(f"{type(self).__name__} needs more than 1 value per channel in training mode "
                                 f"(got {count} over all processes); use a larger batch or call model.eval()")
        return _BatchMoments(mean, var, centered_mean, count, plane_size / count, group)

    def _update_batch_state(self, mean: torch.Tensor, var: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """After a batch-statistics forward: fold the batch's μ, σ² into the running statistics (training only)."""
        if not (self.training and self.track_running_stats):
            return
        factor = self._momentum_factor()
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    @staticmethod
    def _gamma_beta(weight: torch.Tensor | None, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """γ and β in ``dtype``; 1 and 0 for a layer without affine parameters."""
        gamma = weight.to(dtype) if weight is not None else 1.0
        beta = bias.to(dtype) if bias is not None else 0.0
        return gamma, beta

    @staticmethod
    def _affine_shift(beta: torch.Tensor | float, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """β − scale·offset."""
        if isinstance(beta, torch.Tensor):
            return torch.addcmul(beta, scale, offset, value=-1.0)
        return (scale * offset).neg_().add_(beta)

    @staticmethod
    def _moments_backward(grad_centered_mean: torch.Tensor, grad_batch_var: torch.Tensor,
                          moments: _BatchMoments) -> tuple[torch.Tensor, torch.Tensor]:
        """Back-propagate through :meth:`_batch_mean_var`: given this process's ∂L/∂u for u = m − μ (N, C) and its
        share of ∂L/∂σ² (C,), return ∂L/∂m (N, C) and ∂L/∂v (C,) (the same for every sample)."""
        centered_mean = moments.centered_mean
        if moments.group is None:
            batch = centered_mean.shape[0]
            # σ² = mean_n(v) + mean_n(u²): ∂σ²/∂v = 1/N and ∂σ²/∂u = 2u/N; u = m − mean_n(m) centres the gradient
            total = torch.addcmul(grad_centered_mean, centered_mean, grad_batch_var * (2.0 / batch))
            return total - total.mean(0), grad_batch_var / batch
        # μ and σ² are shared by every process's planes, so their gradients are sums over the global batch: one
        # all-reduce of (Σ_n ∂L/∂u, ∂L/∂σ²). With w = H·W / count per plane, σ² = Σ w·(v + u²) and μ = Σ w·m give
        # ∂L/∂m = ∂L/∂u + 2w·u·∂L/∂σ² − w·Σ_all ∂L/∂u (the u-term of μ's gradient is 2w·∂L/∂σ²·Σ_all w·u = 0).
        weight = moments.plane_weight
        reduced = torch.stack([grad_centered_mean.sum(0), grad_batch_var.expand_as(grad_centered_mean[0])])
        grad_mean, grad_batch_var = all_reduce_sum(reduced, moments.group).unbind(0)
        total = torch.addcmul(grad_centered_mean, centered_mean, grad_batch_var * (2.0 * weight))
        return total.sub_(grad_mean * weight), grad_batch_var * weight

    def _calibration_params(self) -> tuple[torch.Tensor | None, ...]:
        """The parameters that the coefficients depend on, in the order the methods below take them."""
        raise NotImplementedError

    def _batch_coefficients(self, mean_nc: torch.Tensor, var_nc: torch.Tensor, plane_size: int,
                            *params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, _BatchMoments, tuple]:
        """Training mode: (A, B') with ``y = x·A + B'`` ((N, C) or (C,) each) from the per-plane mean m and biased
        variance v (N, C), the batch moments from :meth:`_batch_mean_var`, and what
        :meth:`_batch_coefficients_backward` needs (anything, e.g. ``()``, for a variant without one). Written with
        out-of-place tensor ops it is differentiable, which is all the autograd path needs. Changes no state:
        :meth:`_update_batch_state` does, after the forward."""
        raise NotImplementedError

    def _batch_coefficients_backward(self, saved: tuple, grad_scale: torch.Tensor, grad_shift: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Optional, for speed: given ∂L/∂A and ∂L/∂B of the centred form ``y = (x − m)·A + B`` (per plane): ∂L/∂m
        (N, C), ∂L/∂v (broadcastable to (N, C)) and the gradients of :meth:`_calibration_params`."""
        raise NotImplementedError

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: the layer's output from the running statistics (differentiable in the parameters)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sync_batch_stats=True" if self.sync_batch_stats else super().extra_repr()

    _backward_matches_forward: bool = False  # per class, set when the class is created (see __init_subclass__)
    _native_matches_forward: bool = False  # the same for _native_forward (see __init_subclass__)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # decided once per class: a plain attribute read in forward, which torch.compile traces as a constant
        cls._backward_matches_forward = _has_own_backward(cls)
        cls._native_matches_forward = _has_own_native_step(cls)

    def _native_step(self, x: torch.Tensor) -> bool:
        """Whether this training step runs in the C kernels (:mod:`~timm_bninit.native_kernels`): the class's
        coefficient methods are those the kernels compute, the statistics are local, and ``x`` is a float CPU tensor
        in NCHW or channels_last, eager, with running statistics (if any) in its dtype. Otherwise
        :class:`~timm_bninit.norm_kernels.PlaneAffineFunction` runs the Python closed form, with the same results."""
        return (self._native_matches_forward and not torch.compiler.is_compiling() and self._sync_group() is None
                and native_kernels.usable(x, self.running_mean, self.running_var))

    def _native_forward(self, x: torch.Tensor, *params: torch.Tensor | None
                        ) -> tuple[torch.Tensor, native_kernels.StepState]:
        """Optional, for speed (a built-in layer's C step): y, computed as :meth:`_batch_coefficients` and
        ``x·A + B'`` would, and the state from which :func:`~timm_bninit.native_kernels.backward` computes dx and
        the gradients of :meth:`_calibration_params`; updates the layer's state as :meth:`_update_batch_state`
        would (the running statistics in the C call, see :meth:`_native_running`)."""
        raise NotImplementedError

    def _native_running(self) -> native_kernels.Running | None:
        """For :meth:`_native_forward`: the running statistics a training step updates and the update's weight
        (counting the batch, as :meth:`_update_batch_state` does), or None when it updates none."""
        if not (self.training and self.track_running_stats):
            return None
        return native_kernels.Running(self.running_mean, self.running_var, float(self._momentum_factor()))

    def uses_fused_backward(self) -> bool:
        """Whether training takes the hand-written backward (:class:`PlaneAffineFunction`) rather than autograd."""
        return not self.force_autograd and self._backward_matches_forward

    def _autograd_batch_forward(self, x: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :class:`PlaneAffineFunction` returns (y; μ, σ² and unbiased σ² without gradient), differentiated by
        autograd: differentiable per-plane moments → :meth:`_batch_coefficients` → ``x·A + B'``."""
        stats_dtype = self._stats_dtype(x)
        mean_nc = x.mean(dim=(2, 3), dtype=stats_dtype)
        var_nc = (x - plane(mean_nc)).square().mean(dim=(2, 3))  # two-pass, as BN: no E[x²] − E[x]² cancellation
        scale, shift, moments, _ = self._batch_coefficients(mean_nc, var_nc, x.shape[2] * x.shape[3],
                                                            *self._calibration_params())
        y = torch.addcmul(plane(shift), x, plane(scale)).to(x.dtype)  # in the statistics' dtype, stored in x's
        mean, var = moments.mean.detach(), moments.var.detach()
        return y, mean, var, var * (moments.count / max(moments.count - 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_batch_stats():
            if self.uses_fused_backward():
                params = self._calibration_params()
                if self._native_step(x):  # the C step updates the running statistics itself
                    return NativeStepFunction.apply(x, self, *params)
                y, mean, var, unbiased_var = PlaneAffineFunction.apply(x, self, *params)
            else:
                y, mean, var, unbiased_var = self._autograd_batch_forward(x)
            self._update_batch_state(mean, var, unbiased_var)
            return y
        return self._normalize_with_running_stats(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        # as nn.BatchNorm2d, whether or not running statistics are tracked; synchronised, the global count decides
        if self.training and count <= 1 and not self.sync_batch_stats:
            raise BNInitValueError(f"{type(self).__name__} needs more than 1 value per channel in training mode "
                             f"(got batch × H × W = {count}); use a larger batch or call model.eval()")
        y = self.normalize(x)
        if isinstance(self, BatchNormAct2d):
            y = self.act(self.drop(y))
        return y


# The forward methods a hand-written backward is derived from. A subclass that overrides one of them below the class
# whose _batch_coefficients_backward it inherits would pair a new forward with an old backward: it takes autograd.
_COEFFICIENT_METHODS = ("_calibration_params", "_batch_coefficients", "_coefficients", "_batch_mean_var")


# What a layer's C step hard-codes besides the coefficient methods: a subclass that overrides any of these below the
# class that wrote _native_forward computes something else, so it runs the Python closed form.
_NATIVE_METHODS = (*_COEFFICIENT_METHODS, "_batch_coefficients_backward", "_batchnorm_backward_coefficients",
                   "_moments_backward", "_stats_dtype")


def _has_own_native_step(layer_type: type) -> bool:
    """Whether ``layer_type``'s C step (``_native_forward``) belongs to its coefficient methods (walks the MRO)."""
    for klass in layer_type.__mro__:
        defined = vars(klass)
        if "_native_forward" in defined:
            return klass is not _CalibratedBase
        if any(name in defined for name in _NATIVE_METHODS):
            return False
    return False


def _native_params(dtype: torch.dtype, *params: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Parameters as the C kernels read them: contiguous, in the statistics' dtype."""
    return tuple(p if p is None or (p.dtype == dtype and p.is_contiguous()) else p.to(dtype).contiguous()
                 for p in params)


def _has_own_backward(layer_type: type) -> bool:
    """Whether ``layer_type``'s closed-form backward belongs to its forward coefficients (walks the MRO)."""
    for klass in layer_type.__mro__:
        defined = vars(klass)
        if "_batch_coefficients_backward" in defined:
            return klass is not _CalibratedBase
        if any(name in defined for name in _COEFFICIENT_METHODS):
            return False
    return False


class CalibratedBatchNorm2d(_CalibratedBase, nn.BatchNorm2d):
    """Base class of a calibrating variant defined outside timm-bninit (see :class:`_CalibratedBase` for the three
    methods to write). It trains through autograd, synchronises under :func:`timm_bninit.convert_sync_batchnorm`,
    and :func:`norm_act_type` derives its fused twin, so one ``register_norm_layer`` call makes it a norm layer of
    every timm family.
    """


class _RBNBase(_CalibratedBase):
    """RBN (docs/methods.md §2). Extra per-channel parameters: ``centering_weight`` (w_m, init 0), ``scaling_weight``
    (w_v, init 0), ``scaling_bias`` (w_b, init 1).

    ``identity_init=True`` divides the scaling calibration by its initial value σ(w_b0) = σ(1), a constant, so the
    layer starts as exactly BN with its γ (no 0.731 factor); parameters, inits and the sigmoid's operating point are
    otherwise those of RBN.
    """

    extra_tensor_names = ("centering_weight", "scaling_weight", "scaling_bias")
    scaling_bias_init = 1.0

    def __init__(self, num_features: int, *args, identity_init: bool = False, device=None, dtype=None, **kwargs):
        self.identity_init = bool(identity_init)
        super().__init__(num_features, *args, device=device, dtype=dtype, **kwargs)
        factory = {"device": device, "dtype": dtype}
        self.centering_weight = nn.Parameter(torch.empty(num_features, **factory))
        self.scaling_weight = nn.Parameter(torch.empty(num_features, **factory))
        self.scaling_bias = nn.Parameter(torch.empty(num_features, **factory))
        self._reset_extra_tensors()

    @property
    def gamma_init_value(self) -> float | None:
        return 1.0

    @property
    def initial_scale(self) -> float:
        """Effective γ multiplier at init: σ(1) ≈ 0.731, or 1 with ``identity_init``."""
        return 1.0 if self.identity_init else _sigmoid(self.scaling_bias_init)

    def _reset_extra_tensors(self) -> None:
        if getattr(self, "scaling_bias", None) is None:
            return  # called by nn.BatchNorm2d.__init__ before the extra parameters exist
        with torch.no_grad():
            self.centering_weight.zero_()
            self.scaling_weight.zero_()
            self.scaling_bias.fill_(self.scaling_bias_init)

    def _calibration_params(self) -> tuple[torch.Tensor | None, ...]:
        return self.weight, self.bias, self.centering_weight, self.scaling_weight, self.scaling_bias

    def _coefficients(self, mean_nc, centered_mean, var, weight, bias, centering_weight, scaling_weight,
                      scaling_bias):
        """(A, B') with ``y = x·A + B'`` from the plane means m and the batch or running (μ, σ²) of the calibrated
        input: y = γ·s·x̂ + β, x̂ = (x − m + u)·r with u = (1 + w_m)·m − μ (``centered_mean``),
        r = 1/sqrt(σ² + ε), s = k·σ(w_v·GAP(x̂) + w_b), GAP(x̂) = u·r (k = 1/σ(w_b0) with ``identity_init``)."""
        dtype = mean_nc.dtype
        inv_std = (var + self.eps).rsqrt_()
        gap_normalized = centered_mean * inv_std
        logit_weight = scaling_weight.to(dtype)
        sigmoid = torch.addcmul(scaling_bias.to(dtype), logit_weight, gap_normalized).sigmoid_()
        calibration = sigmoid * self._calibration_factor if self.identity_init else sigmoid
        gamma, beta = self._gamma_beta(weight, bias, dtype)
        gain = gamma * inv_std
        scale = calibration * gain
        shift = self._affine_shift(beta, scale, mean_nc - centered_mean)  # B' = β + A·(u − m)
        saved = (mean_nc, centering_weight.to(dtype), centered_mean, gap_normalized, inv_std, sigmoid, calibration,
                 scale, gamma, logit_weight)
        return scale, shift, saved

    @property
    def _calibration_factor(self) -> float:
        """k in s = k·σ(z): 1/σ(w_b0) with ``identity_init``, else 1."""
        return 1.0 / _sigmoid(self.scaling_bias_init) if self.identity_init else 1.0

    def _native_forward(self, x, *params):
        return native_kernels.rbn_forward(x, self.eps, self._calibration_factor, *_native_params(x.dtype, *params),
                                          running=self._native_running())

    def _batch_coefficients(self, mean_nc, var_nc, plane_size, *params):
        # x_c = x + w_m·GAP(x) shifts each (n, c) plane by a constant: its within-plane variance is unchanged, so
        # the batch statistics of x_c follow from (m_c, v) with m_c = (1 + w_m)·m.
        calibrated_mean_nc = torch.addcmul(mean_nc, mean_nc, params[2].to(mean_nc.dtype))
        moments = self._batch_mean_var(calibrated_mean_nc, var_nc, plane_size)
        scale, shift, saved = self._coefficients(mean_nc, moments.centered_mean, moments.var, *params)
        return scale, shift, moments, (moments, *saved)

    def _batch_coefficients_backward(self, saved, grad_scale, grad_shift):
        (moments, mean_nc, centering_weight, centered_mean, gap_normalized, inv_std, sigmoid, calibration, scale,
         gamma, logit_weight) = saved
        grad_scale = torch.addcmul(grad_scale, grad_shift, centered_mean)  # B = A·u + β depends on A too
        grad_gain = (grad_scale * calibration).sum(0)
        grad_calibration = grad_scale * scale  # ∂L/∂s · s
        grad_logit = torch.addcmul(grad_calibration, grad_calibration, sigmoid, value=-1.0)  # ∂s/∂z = s·(1 − σ(z))
        grad_gap = grad_logit * logit_weight
        grad_inv_std = torch.addcmul((grad_gap * centered_mean).sum(0), grad_gain, gamma) if isinstance(
            gamma, torch.Tensor) else (grad_gap * centered_mean).sum(0).add_(grad_gain)
        grad_batch_var = grad_inv_std.mul_(inv_std.pow(3)).mul_(-0.5)
        grad_centered_mean = torch.addcmul(grad_shift * scale, grad_gap, inv_std)
        grad_calibrated_mean, grad_var = self._moments_backward(grad_centered_mean, grad_batch_var, moments)
        param_grads = (grad_gain * inv_std, grad_shift.sum(0), (grad_calibrated_mean * mean_nc).sum(0),
                       (grad_logit * gap_normalized).sum(0), grad_logit.sum(0))
        return torch.addcmul(grad_calibrated_mean, grad_calibrated_mean, centering_weight), grad_var, param_grads

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        params = self._calibration_params()
        mean_nc = x.mean(dim=(2, 3), dtype=dtype)
        centered_mean = mean_nc * (1.0 + params[2].to(dtype)) - self.running_mean.to(dtype)
        scale, shift, _ = self._coefficients(mean_nc, centered_mean, self.running_var.to(dtype), *params)
        return plane_affine(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, identity_init={self.identity_init}"


class RepresentativeBatchNorm2d(_RBNBase, nn.BatchNorm2d):
    """Representative BatchNorm with feature calibration (Gao et al., CVPR 2021); see :class:`_RBNBase`."""


@_fused_twin_of(RepresentativeBatchNorm2d)
class RepresentativeBatchNormAct2d(_RBNBase, BatchNormAct2d):
    """:class:`RepresentativeBatchNorm2d` fused with timm's activation."""


class _IEBNBase(_CalibratedBase):
    """IEBN (docs/methods.md §3). Extra per-channel parameters: ``instance_weight`` (γ̂, init 0), ``instance_bias``
    (β̂, init −1). ``a = σ(γ̂·GAP(x) + β̂)`` on the raw input, ``y = x̂·(γ·a) + β``.

    ``identity_init=True`` divides ``a`` by its initial value σ(−1) ≈ 0.269, a constant, so the layer starts as
    exactly BN with its γ.
    """

    extra_tensor_names = ("instance_weight", "instance_bias")
    instance_bias_init = -1.0

    def __init__(self, num_features: int, *args, identity_init: bool = False, device=None, dtype=None, **kwargs):
        self.identity_init = bool(identity_init)
        super().__init__(num_features, *args, device=device, dtype=dtype, **kwargs)
        factory = {"device": device, "dtype": dtype}
        self.instance_weight = nn.Parameter(torch.empty(num_features, **factory))
        self.instance_bias = nn.Parameter(torch.empty(num_features, **factory))
        self._reset_extra_tensors()

    @property
    def initial_scale(self) -> float:
        """Effective γ multiplier at init: σ(−1) ≈ 0.269, or 1 with ``identity_init``."""
        return 1.0 if self.identity_init else _sigmoid(self.instance_bias_init)

    def _reset_extra_tensors(self) -> None:
        if getattr(self, "instance_bias", None) is None:
            return
        with torch.no_grad():
            self.instance_weight.zero_()
            self.instance_bias.fill_(self.instance_bias_init)

    def _calibration_params(self) -> tuple[torch.Tensor | None, ...]:
        return self.weight, self.bias, self.instance_weight, self.instance_bias

    def _coefficients(self, mean_nc, mean, var, weight, bias, instance_weight, instance_bias):
        """(A, B') with ``y = x·A + B'`` from the plane means m and the batch or running (μ, σ²):
        y = (x − μ)·r·γ·a + β with r = 1/sqrt(σ² + ε), a = k·σ(γ̂·m + β̂) (k = 1/σ(β̂0) with ``identity_init``)."""
        dtype = mean_nc.dtype
        inv_std = (var + self.eps).rsqrt_()
        logit_weight = instance_weight.to(dtype)
        sigmoid = torch.addcmul(instance_bias.to(dtype), logit_weight, mean_nc).sigmoid_()
        attention = sigmoid * self._calibration_factor if self.identity_init else sigmoid
        gamma, beta = self._gamma_beta(weight, bias, dtype)
        gain = gamma * inv_std
        scale = attention * gain
        saved = (mean_nc, inv_std, sigmoid, attention, scale, gamma, logit_weight)
        return scale, self._affine_shift(beta, scale, mean), saved

    @property
    def _calibration_factor(self) -> float:
        """k in a = k·σ(z): 1/σ(β̂0) with ``identity_init``, else 1."""
        return 1.0 / _sigmoid(self.instance_bias_init) if self.identity_init else 1.0

    def _native_forward(self, x, *params):
        return native_kernels.iebn_forward(x, self.eps, self._calibration_factor, *_native_params(x.dtype, *params),
                                           running=self._native_running())

    def _batch_coefficients(self, mean_nc, var_nc, plane_size, *params):
        moments = self._batch_mean_var(mean_nc, var_nc, plane_size)
        scale, shift, saved = self._coefficients(mean_nc, moments.mean, moments.var, *params)
        return scale, shift, moments, (moments, *saved)

    def _batch_coefficients_backward(self, saved, grad_scale, grad_shift):
        moments, mean_nc, inv_std, sigmoid, attention, scale, gamma, logit_weight = saved
        grad_scale = torch.addcmul(grad_scale, grad_shift, moments.centered_mean)  # B = A·(m − μ) + β depends on A
        grad_gain = (grad_scale * attention).sum(0)
        grad_attention = grad_scale * scale  # ∂L/∂a · a
        grad_logit = torch.addcmul(grad_attention, grad_attention, sigmoid, value=-1.0)  # ∂a/∂z = a·(1 − σ(z))
        grad_batch_var = (grad_gain * gamma).mul_(inv_std.pow(3)).mul_(-0.5)
        grad_mean_nc, grad_var = self._moments_backward(grad_shift * scale, grad_batch_var, moments)
        param_grads = (grad_gain * inv_std, grad_shift.sum(0), (grad_logit * mean_nc).sum(0), grad_logit.sum(0))
        return grad_mean_nc.addcmul_(grad_logit, logit_weight), grad_var, param_grads

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        scale, shift, _ = self._coefficients(x.mean(dim=(2, 3), dtype=dtype), self.running_mean.to(dtype),
                                             self.running_var.to(dtype), *self._calibration_params())
        return plane_affine(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, identity_init={self.identity_init}"


class InstanceEnhancementBatchNorm2d(_IEBNBase, nn.BatchNorm2d):
    """Instance Enhancement BatchNorm (Liang et al., AAAI 2020); see :class:`_IEBNBase`."""


@_fused_twin_of(InstanceEnhancementBatchNorm2d)
class InstanceEnhancementBatchNormAct2d(_IEBNBase, BatchNormAct2d):
    """:class:`InstanceEnhancementBatchNorm2d` fused with timm's activation."""


class _BlendedStdBase(_CalibratedBase):
    """BN without γ whose σ is blended with the previous training batch's (docs/methods.md §4):

    ``y = (x − μ_B) / (α·σ_prev + (1 − α)·σ_B) + β`` with α = ``prev_std_weight``.

    Decisions (also in docs/guide/layers.md):

    * σ_B = sqrt(var_B + ε): ε sits inside the square root, exactly where BN puts it; var_B is the biased batch
      variance, as BN normalises with.
    * σ_prev is the previous *training* batch's σ_B of this layer, kept in the ``prev_std`` buffer (saved in the
      state dict so a resumed run continues exactly) and treated as a constant (no gradient).
    * First step (no previous batch, ``prev_std`` = 0 for that channel): σ_B alone.
    * Eval uses the running statistics exactly as BN does: ``(x − running_mean) / sqrt(running_var + ε) + β``.
    * There is no γ: ``weight`` is an unused placeholder buffer (not a parameter, not saved) so that model families'
      init code still runs, and a γ ≠ 1 in a loaded checkpoint is dropped with a warning.
    * Under DDP both σ_B and σ_prev are per-device, as plain BN's batch statistics are, unless the layer is
      synchronised (``sync_batch_stats``, set by :func:`timm_bninit.convert_sync_batchnorm`): then σ_B is the global
      batch's and σ_prev the previous global batch's, the same on every process.
    """

    extra_tensor_names = ("prev_std",)

    def __init__(self, num_features: int, *args, prev_std_weight: float = 0.5, device=None, dtype=None, **kwargs):
        if not 0.0 <= prev_std_weight < 1.0:
            raise BNInitValueError(f"prev_std_weight (α) must be in [0, 1), got {prev_std_weight}")
        self.prev_std_weight = float(prev_std_weight)
        super().__init__(num_features, *args, device=device, dtype=dtype, **kwargs)
        # No γ. Model families' init code writes BN weights (``nn.init.ones_(m.weight)``), so ``weight`` stays as a
        # non-persistent placeholder buffer that forward never reads; β stays a parameter.
        gamma_placeholder = torch.ones(num_features, device=device, dtype=dtype)
        del self.weight
        self.register_buffer("weight", gamma_placeholder, persistent=False)
        self.register_buffer("prev_std", torch.zeros(num_features, device=device, dtype=dtype))

    @property
    def gamma_init_value(self) -> float | None:
        return None

    def _reset_extra_tensors(self) -> None:
        if getattr(self, "prev_std", None) is not None:
            self.prev_std.zero_()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._reset_extra_tensors()

    def _calibration_params(self) -> tuple[torch.Tensor | None, ...]:
        return (self.bias,)

    def _batch_coefficients(self, mean_nc, var_nc, plane_size, bias):
        """(A, B') with ``y = x·A + B'``: y = (x − μ)/σ + β, σ blended with the previous batch's in training."""
        dtype = mean_nc.dtype
        moments = self._batch_mean_var(mean_nc, var_nc, plane_size)
        mean, batch_std = moments.mean, (moments.var + self.eps).sqrt_()
        std, std_grad_factor = batch_std, 1.0  # ∂σ/∂σ_B
        if self.training:
            prev_std = read_state(self.prev_std).to(dtype)
            has_prev = prev_std > 0
            blended = torch.lerp(batch_std, prev_std, self.prev_std_weight)  # α·σ_prev + (1 − α)·σ_B
            std = torch.where(has_prev, blended, batch_std)
            std_grad_factor = 1.0 - self.prev_std_weight * has_prev.to(dtype)
        scale = std.reciprocal()
        beta = bias.to(dtype) if bias is not None else 0.0
        return scale, self._affine_shift(beta, scale, mean), moments, (moments, batch_std, std_grad_factor, scale)

    def _native_forward(self, x, bias):
        # σ_prev as this step reads it: a copy, since the step writes this batch's σ_B into the buffer
        prev_std = self.prev_std.to(x.dtype, copy=True) if self.training else None
        return native_kernels.blend_forward(x, self.eps, self.prev_std_weight, prev_std,
                                            *_native_params(x.dtype, bias), running=self._native_running(),
                                            next_prev_std=self.prev_std if self.training else None)

    def _batchnorm_backward_coefficients(self, saved: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ', 1/σ') with which BN's own training-mode backward is this layer's input gradient, so that the kernels
        run BN's fused backward (see :class:`~timm_bninit.norm_kernels.PlaneAffineFunction`).

        With σ_prev constant, dx = (dy − mean(dy))/σ − (1 − α')·mean(dy·(x − μ))·(x − μ)/(σ²·σ_B) (α' = α once
        blended, 0 on a first step), which is BN's (γ'·(1/σ'))·(dy − mean(dy) − (1/σ')²·mean(dy·(x − μ))·(x − μ))
        for (1/σ')² = (1 − α')/(σ·σ_B) and γ' = σ'/σ.
        """
        _, batch_std, std_grad_factor, scale = saved
        invstd = (scale * std_grad_factor / batch_std).sqrt_()
        return scale / invstd, invstd

    def _update_batch_state(self, mean: torch.Tensor, var: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        super()._update_batch_state(mean, var, unbiased_var)
        if self.training:  # the next training batch's σ_prev: this batch's σ_B
            with torch.no_grad():
                self.prev_std.copy_((var + self.eps).sqrt_())

    def _batch_coefficients_backward(self, saved, grad_scale, grad_shift):
        moments, batch_std, std_grad_factor, scale = saved
        grad_scale = torch.addcmul(grad_scale, grad_shift, moments.centered_mean).sum(0)  # B = A·u + β depends on A
        # A = 1/σ, σ = α·σ_prev + (1 − α)·σ_B (σ_prev constant), σ_B = sqrt(σ² + ε)
        grad_batch_var = (grad_scale * scale.square()).mul_(std_grad_factor).div_(batch_std).mul_(-0.5)
        grad_mean_nc, grad_var = self._moments_backward(grad_shift * scale, grad_batch_var, moments)
        return grad_mean_nc, grad_var, (grad_shift.sum(0),)

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        scale = 1.0 / torch.sqrt(self.running_var.to(dtype) + self.eps)
        beta = self.bias.to(dtype) if self.bias is not None else 0.0
        return plane_affine(x, scale, beta - self.running_mean.to(dtype) * scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        gamma = state_dict.pop(prefix + "weight", None)
        if gamma is not None and not torch.allclose(gamma, torch.ones_like(gamma)):
            import warnings

            warnings.warn(f"{prefix or type(self).__name__}: {type(self).__name__} has no γ; the checkpoint's γ "
                          f"(mean {gamma.float().mean().item():.3g}) was dropped", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prev_std_weight={self.prev_std_weight:g}"


class BlendedStdBatchNorm2d(_BlendedStdBase, nn.BatchNorm2d):
    """BatchNorm without γ, σ blended with the previous batch's; see :class:`_BlendedStdBase`."""


@_fused_twin_of(BlendedStdBatchNorm2d)
class BlendedStdBatchNormAct2d(_BlendedStdBase, BatchNormAct2d):
    """:class:`BlendedStdBatchNorm2d` fused with timm's activation."""


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


@functools.cache
def norm_act_type(layer_type: type) -> type[BatchNormAct2d] | None:
    """The fused norm+act twin of a timm-bninit layer class, for the model families built through timm's norm+act
    registry (efficientnet, regnet, resnetv2, ...).

    A built-in layer has its own (``RepresentativeBatchNorm2d`` → ``RepresentativeBatchNormAct2d``). Any other
    subclass of a timm-bninit layer gets one derived by inheritance, ``class <Name>Act2d(layer_type,
    BatchNormAct2d)``: its own methods (zero-argument ``super()`` included) run unchanged, with timm's activation and
    drop path after them, and every call returns the same class. Such a derived class is not importable by name, so
    a whole pickled module (not its state dict) needs the user's own twin: ``register_norm_layer(name, layer,
    norm_act_layer=...)``.

    Returns:
        The twin, or None for a class that is not a plain (non-fused) timm-bninit layer.

    Example::

        fused = norm_act_type(MyVariant2d)(64, act_layer=nn.SiLU)
    """
    if layer_type in _DECLARED_TWINS:
        return _DECLARED_TWINS[layer_type]
    if not (isinstance(layer_type, type) and issubclass(layer_type, BatchNormVariant)
            and issubclass(layer_type, nn.BatchNorm2d)) or issubclass(layer_type, BatchNormAct2d):
        return None
    stem = layer_type.__name__.removesuffix("2d")
    name = f"{stem}Act2d" if stem != layer_type.__name__ else f"{stem}Act"
    doc = f":class:`{layer_type.__qualname__}` fused with timm's activation (derived by ``norm_act_type``)."
    return type(name, (layer_type, BatchNormAct2d), {"__module__": layer_type.__module__, "__doc__": doc})
