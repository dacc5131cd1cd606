"""Batch-normalisation variants as drop-in ``nn.BatchNorm2d`` subclasses.

Every layer here subclasses ``nn.BatchNorm2d`` so that pretrained state-dict keys keep matching, and accepts
``device``/``dtype`` like any torch layer. Formulas are per channel and follow ``shared/REFERENCE.md``:

* :class:`BatchNormGamma2d`: ordinary BN whose γ starts at γ0 < 1 and whose γ learning rate is divided by
  ``gamma_lr_div`` (Davis & Frank, §1). At run time it *is* plain BN.
* :class:`BatchNormUniformGamma2d`: γ ~ U(0, 1), β = 0 (Frankle et al., §5).
* :class:`RepresentativeBatchNorm2d`: RBN with centering and scaling calibration (Gao et al., §2).
* :class:`InstanceEnhancementBatchNorm2d`: IEBN (Liang et al., §3).
* :class:`BlendedStdBatchNorm2d`: BN without γ, σ blended with the previous batch's (§4).

The calibrating layers (RBN, IEBN, blend) never materialise the normalised tensor: they need only the per-(sample,
channel) mean and variance of the input (one statistics pass), from which the whole layer reduces to
``y = x · A[n, c] + B[n, c]`` (one elementwise pass).
"""

from __future__ import annotations

import math

import torch
from timm.layers import BatchNormAct2d
from torch import nn

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
    "VARIANT_TYPES",
]


class BatchNormVariant:
    """Behaviour shared by every timm-bninit norm layer (a mixin placed before ``nn.BatchNorm2d``).

    Attributes:
        gamma_lr_div: divisor of γ's (``weight``'s) learning rate, read by :func:`timm_bninit.param_groups`
            (``c`` in Davis & Frank). 1 means γ trains at the base learning rate.
        extra_tensor_names: names of the per-channel ``(C,)`` tensors this layer adds to a standard BN state dict.
    """

    gamma_lr_div: float = 1.0
    extra_tensor_names: tuple[str, ...] = ()

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


# --------------------------------------------------------------------------------------------------------------
# γ-initialisation variants: plain BN at run time.


class _GammaInitBase(BatchNormVariant):
    def __init__(self, num_features: int, *args, gamma_init: float = 0.1, gamma_lr_div: float = 100.0, **kwargs):
        if not gamma_lr_div > 0:
            raise ValueError(f"gamma_lr_div must be > 0 (the γ learning rate is base_lr / gamma_lr_div), "
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


class BatchNormGammaAct2d(_GammaInitBase, BatchNormAct2d):
    """:class:`BatchNormGamma2d` fused with timm's activation (for the families built through norm+act layers)."""


class _UniformGammaBase(BatchNormVariant):
    @property
    def gamma_init_value(self) -> float | None:
        return None  # random: there is no single γ0

    def _init_gamma(self, weight: torch.Tensor) -> None:
        weight.uniform_(0.0, 1.0)


class BatchNormUniformGamma2d(_UniformGammaBase, nn.BatchNorm2d):
    """BatchNorm with γ ~ U(0, 1) and β = 0 (PyTorch's pre-1.2 default; Frankle, Schwab & Morcos)."""


class BatchNormUniformGammaAct2d(_UniformGammaBase, BatchNormAct2d):
    """:class:`BatchNormUniformGamma2d` fused with timm's activation."""


# --------------------------------------------------------------------------------------------------------------
# Calibrating variants: own forward, computed from per-(sample, channel) statistics.


def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{type(layer).__name__} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != layer.num_features:
        raise ValueError(f"{type(layer).__name__} was built for {layer.num_features} channels but the input has "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")


class _CalibratedBase(BatchNormVariant):
    """Forward machinery shared by RBN, IEBN and the blended-σ layer."""

    def _stats_dtype(self, x: torch.Tensor) -> torch.dtype:
        # statistics in at least float32 (as BN does under mixed precision); float64 stays float64 for gradcheck
        return torch.promote_types(x.dtype, torch.float32)

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _momentum_factor(self) -> float:
        """The running-statistics update factor, exactly as ``nn.BatchNorm2d`` computes it."""
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-(sample, channel) mean and variance of ``x`` over H×W in the statistics dtype, and N·H·W."""
        var_nc, mean_nc = torch.var_mean(x, dim=(2, 3), correction=0)
        dtype = self._stats_dtype(x)
        return mean_nc.to(dtype), var_nc.to(dtype), x.shape[0] * x.shape[2] * x.shape[3]

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if not (self.training and self.track_running_stats):
            return
        if count <= 1:
            raise ValueError(f"{type(self).__name__} needs more than 1 value per channel in training mode "
                             f"(got batch × H × W = {count}); use a larger batch or call model.eval()")
        factor = self._momentum_factor()
        with torch.no_grad():
            unbiased = var.detach() * (count / (count - 1))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

    @staticmethod
    def _scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``x · scale + shift`` with (N, C) or (C,) scale and shift, in one elementwise pass."""
        if scale.dim() == 1:
            scale, shift = scale[None], shift[None]
        scale = scale.to(x.dtype)[:, :, None, None]
        shift = shift.to(x.dtype)[:, :, None, None]
        return torch.addcmul(shift, x, scale)

    def _gamma_beta(self, dtype: torch.dtype) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        gamma = self.weight.to(dtype) if self.weight is not None else 1.0
        beta = self.bias.to(dtype) if self.bias is not None else 0.0
        return gamma, beta

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        y = self.normalize(x)
        if isinstance(self, BatchNormAct2d):
            y = self.act(self.drop(y))
        return y


class _RBNBase(_CalibratedBase):
    """RBN (REFERENCE §2). Extra per-channel parameters: ``centering_weight`` (w_m, init 0), ``scaling_weight``
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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        w_m = self.centering_weight.to(dtype)
        if self._uses_batch_stats():
            mean_nc, var_nc, count = self._batch_moments(x)
            # x_c = x + w_m·GAP(x) shifts each (n, c) plane by a constant: its within-plane variance is unchanged,
            # so the batch variance of x_c is mean_n(var_nc) + var_n(mean of x_c) (law of total variance).
            centered_mean_nc = mean_nc * (1.0 + w_m)
            mean = centered_mean_nc.mean(0)
            var = var_nc.mean(0) + (centered_mean_nc - mean).square().mean(0)
            self._update_running_stats(mean, var, count)
        else:
            mean_nc = x.mean(dim=(2, 3), dtype=dtype)
            centered_mean_nc = mean_nc * (1.0 + w_m)
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        inv_std = torch.rsqrt(var + self.eps)
        gap_normalized = (centered_mean_nc - mean) * inv_std  # GAP(x̂)
        scale_calibration = torch.sigmoid(self.scaling_weight.to(dtype) * gap_normalized
                                          + self.scaling_bias.to(dtype))
        if self.identity_init:
            scale_calibration = scale_calibration / _sigmoid(self.scaling_bias_init)
        gamma, beta = self._gamma_beta(dtype)
        # y = γ·s·x̂ + β with x̂ = (x + w_m·m − μ)·inv_std
        scale = gamma * scale_calibration * inv_std
        shift = scale * (w_m * mean_nc - mean) + beta
        return self._scale_shift(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, identity_init={self.identity_init}"


class RepresentativeBatchNorm2d(_RBNBase, nn.BatchNorm2d):
    """Representative BatchNorm with feature calibration (Gao et al., CVPR 2021); see :class:`_RBNBase`."""


class RepresentativeBatchNormAct2d(_RBNBase, BatchNormAct2d):
    """:class:`RepresentativeBatchNorm2d` fused with timm's activation."""


class _IEBNBase(_CalibratedBase):
    """IEBN (REFERENCE §3). Extra per-channel parameters: ``instance_weight`` (γ̂, init 0), ``instance_bias``
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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        if self._uses_batch_stats():
            mean_nc, var_nc, count = self._batch_moments(x)
            mean = mean_nc.mean(0)
            var = var_nc.mean(0) + (mean_nc - mean).square().mean(0)
            self._update_running_stats(mean, var, count)
        else:
            mean_nc = x.mean(dim=(2, 3), dtype=dtype)
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        inv_std = torch.rsqrt(var + self.eps)
        attention = torch.sigmoid(self.instance_weight.to(dtype) * mean_nc + self.instance_bias.to(dtype))
        if self.identity_init:
            attention = attention / _sigmoid(self.instance_bias_init)
        gamma, beta = self._gamma_beta(dtype)
        scale = gamma * attention * inv_std
        shift = beta - scale * mean
        return self._scale_shift(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, identity_init={self.identity_init}"


class InstanceEnhancementBatchNorm2d(_IEBNBase, nn.BatchNorm2d):
    """Instance Enhancement BatchNorm (Liang et al., AAAI 2020); see :class:`_IEBNBase`."""


class InstanceEnhancementBatchNormAct2d(_IEBNBase, BatchNormAct2d):
    """:class:`InstanceEnhancementBatchNorm2d` fused with timm's activation."""


class _BlendedStdBase(_CalibratedBase):
    """BN without γ whose σ is blended with the previous training batch's (REFERENCE §4):

    ``y = (x − μ_B) / (α·σ_prev + (1 − α)·σ_B) + β`` with α = ``prev_std_weight``.

    Decisions (also in the README):

    * σ_B = sqrt(var_B + ε): ε sits inside the square root, exactly where BN puts it; var_B is the biased batch
      variance, as BN normalises with.
    * σ_prev is the previous *training* batch's σ_B of this layer, kept in the ``prev_std`` buffer (saved in the
      state dict so a resumed run continues exactly) and treated as a constant (no gradient).
    * First step (no previous batch, ``prev_std`` = 0 for that channel): σ_B alone.
    * Eval uses the running statistics exactly as BN does: ``(x − running_mean) / sqrt(running_var + ε) + β``.
    * There is no γ: ``weight`` is an unused placeholder buffer (not a parameter, not saved) so that model families'
      init code still runs, and a γ ≠ 1 in a loaded checkpoint is dropped with a warning.
    * Under DDP both σ_B and σ_prev are per-device, as plain BN's batch statistics are.
    """

    extra_tensor_names = ("prev_std",)

    def __init__(self, num_features: int, *args, prev_std_weight: float = 0.5, device=None, dtype=None, **kwargs):
        if not 0.0 <= prev_std_weight < 1.0:
            raise ValueError(f"prev_std_weight (α) must be in [0, 1), got {prev_std_weight}")
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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._stats_dtype(x)
        if self._uses_batch_stats():
            mean_nc, var_nc, count = self._batch_moments(x)
            mean = mean_nc.mean(0)
            var = var_nc.mean(0) + (mean_nc - mean).square().mean(0)
            self._update_running_stats(mean, var, count)
            batch_std = torch.sqrt(var + self.eps)
            std = batch_std
            if self.training:
                prev_std = self.prev_std.to(dtype, copy=True)  # updated in place below
                blended = self.prev_std_weight * prev_std + (1.0 - self.prev_std_weight) * batch_std
                std = torch.where(prev_std > 0, blended, batch_std)
                with torch.no_grad():
                    self.prev_std.copy_(batch_std.detach())
        else:
            mean = self.running_mean.to(dtype)
            std = torch.sqrt(self.running_var.to(dtype) + self.eps)
        scale = 1.0 / std
        beta = self.bias.to(dtype) if self.bias is not None else 0.0
        shift = beta - mean * scale
        return self._scale_shift(x, scale, shift)

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


class BlendedStdBatchNormAct2d(_BlendedStdBase, BatchNormAct2d):
    """:class:`BlendedStdBatchNorm2d` fused with timm's activation."""


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


# Each plain layer with its fused norm+act twin: the registry and model patching use this pairing.
VARIANT_TYPES: dict[type[nn.BatchNorm2d], type[BatchNormAct2d]] = {
    BatchNormGamma2d: BatchNormGammaAct2d,
    BatchNormUniformGamma2d: BatchNormUniformGammaAct2d,
    RepresentativeBatchNorm2d: RepresentativeBatchNormAct2d,
    InstanceEnhancementBatchNorm2d: InstanceEnhancementBatchNormAct2d,
    BlendedStdBatchNorm2d: BlendedStdBatchNormAct2d,
}
