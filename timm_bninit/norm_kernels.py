"""Per-(sample, channel) plane kernels of the calibrating norm layers (RBN, IEBN, blended-σ), beside the layers in
:mod:`timm_bninit.norm` as timm keeps ``fast_norm.py`` beside ``norm.py``.

The calibrating layers never materialise the normalised tensor: they need only the per-(sample, channel) mean m and
variance v of the input, from which the whole layer reduces to ``y = (x − m)·A[n, c] + B[n, c]`` with small (N, C)
tensors A and B. In training, :class:`PlaneAffineFunction` computes this with as many full passes over the
activation as BN's own kernels, and a closed-form backward for the small (N, C) part, which the layer supplies
(``_batch_coefficients`` / ``_batch_coefficients_backward``). A built-in layer's step on a float CPU batch runs
in the C kernels of :mod:`timm_bninit.native_kernels` instead, through :class:`NativeStepFunction`.

Also here: the cross-process reductions of synchronised layers (:func:`all_gather_moments` in forward,
:func:`all_reduce_sum` in backward), and :func:`read_state`, which keeps a compiled backward from re-reading a buffer
that the forward has overwritten. Under ``torch.compile`` every kernel takes its portable tensor-op form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.autograd.function import once_differentiable

from . import native_kernels

__all__ = ["NativeStepFunction", "PlaneAffineFunction", "all_gather_moments", "all_reduce_sum", "plane",
           "plane_affine", "plane_grad_sums", "plane_moments", "read_state"]

# Per-(sample, channel) plane kernels. On CPU, BN's own kernels do the activation-sized work, run so that each BN
# "channel" is one (sample, channel) plane: for an NCHW-contiguous input on the (1, N·C, H, W) view of the whole batch
# (one call), for a channels_last input on each (1, C, H, W) sample, itself a channels_last tensor whose channels are
# that sample's planes (one call per sample; the per-plane affine map is there one broadcast ``addcmul``, which the
# channels_last layout vectorises along C). They give two-pass plane moments, the affine map and a fused Σdy /
# Σdy·(x − m) reduction faster than the broadcast tensor ops (measured in benchmarks/bench_norm.py); elsewhere (other
# devices, low-precision inputs, other layouts, compiled) the portable tensor ops do the same.
_VARIANCE_CHUNK_ELEMENTS = 1 << 20  # on CPU, x − m exists one cache-sized chunk at a time


def plane(values: torch.Tensor) -> torch.Tensor:
    """(N, C) or (C,) per-plane values as a tensor that broadcasts against (N, C, H, W)."""
    return values[..., None, None]


def _kernel_layout(*tensors: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which BN's CPU kernels serve every tensor (``torch.contiguous_format``: the planes view;
    ``torch.channels_last``: per sample), or None for the portable tensor ops."""
    if torch.compiler.is_compiling():
        return None  # dynamo cannot trace the ``out=`` BN kernels, and inductor fuses the portable ops itself
    if not all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors):
        return None
    if all(t.is_contiguous() for t in tensors):  # first: a tensor with C == 1 or H·W == 1 is in both formats
        return torch.contiguous_format
    if all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return torch.channels_last
    return None


def _planes_view(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def plane_moments(x: torch.Tensor, stats_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-plane mean and biased variance, two-pass (Σ(x − m)² after m, as BN computes it: no cancellation).

    ``torch.var_mean`` would do this in one call but is several times slower than BN's whole forward on CPU.
    """
    if stats_dtype == x.dtype and _kernel_layout(x) == torch.channels_last:
        # BN's channels_last statistics kernel on each sample: its mean, then Σ(x − mean)² while the sample is in cache
        means, variances = zip(*[torch.batch_norm_update_stats(sample, None, None, 0.0) for sample in x.split(1)])
        return torch.stack(means), torch.stack(variances)
    mean_nc = x.mean(dim=(2, 3), dtype=stats_dtype)
    batch, mean = x.shape[0], plane(mean_nc)
    step = batch
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled, x − m is fused into the reduction
        step = max(1, min(batch, _VARIANCE_CHUNK_ELEMENTS // max(1, x[0].numel())))
    if step == batch:
        norm_nc = torch.linalg.vector_norm(x - mean, dim=(2, 3), dtype=stats_dtype)
    else:
        buffer = torch.empty_like(x[:step], dtype=stats_dtype)
        norm_nc = torch.empty_like(mean_nc)
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            chunk = torch.sub(x[start:stop], mean[start:stop], out=buffer[:stop - start])
            torch.linalg.vector_norm(chunk, dim=(2, 3), out=norm_nc[start:stop])
    return mean_nc, norm_nc.square_().div_(x.shape[2] * x.shape[3])


def plane_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x·scale + shift`` with per-plane (N, C) or per-channel (C,) scale and shift, in one elementwise pass
    computed in their dtype and stored in x's. With autograd recording (eval mode with trainable parameters) it is
    one differentiable ``addcmul`` in x's dtype instead: the fused kernels write through ``out=``."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return torch.addcmul(plane(shift.to(x.dtype)), x, plane(scale.to(x.dtype)))
    if scale.dtype == x.dtype and _kernel_layout(x) == torch.contiguous_format:
        planes = x.shape[0] * x.shape[1]
        scale, shift = scale.expand(x.shape[:2]).reshape(planes), shift.expand(x.shape[:2]).reshape(planes)
        ones, unused = torch.ones(planes, dtype=x.dtype), torch.empty(0, dtype=x.dtype)
        y = torch.empty_like(x)  # written through the planes view, so that y itself is not a view (in-place ReLU)
        # eval-mode BN with mean 0, var 1, ε = 0 computes exactly x·weight + bias
        torch.ops.aten.native_batch_norm.out(_planes_view(x), scale, shift, torch.zeros_like(ones), ones, False, 0.0,
                                             0.0, out=_planes_view(y), save_mean=unused, save_invstd=unused.clone())
        return y
    # empty_like keeps x's memory format, so a channels_last input gives a channels_last output, as in nn.BatchNorm2d
    return torch.addcmul(plane(shift), x, plane(scale), out=torch.empty_like(x))


def plane_grad_sums(grad_y: torch.Tensor, x: torch.Tensor, mean_nc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-plane Σdy and Σdy·(x − m), in m's dtype."""
    layout = _kernel_layout(grad_y, x) if mean_nc.dtype == x.dtype == grad_y.dtype else None
    if layout == torch.contiguous_format:
        dot, total = _bn_grad_sums(_planes_view(grad_y), _planes_view(x), mean_nc.reshape(-1),
                                   torch.ones(mean_nc.numel(), dtype=x.dtype))
        return total.view_as(mean_nc), dot.view_as(mean_nc)
    if layout == torch.channels_last:
        ones = torch.ones(x.shape[1], dtype=x.dtype)
        dots, totals = zip(*[_bn_grad_sums(dy, sample, mean, ones)
                             for dy, sample, mean in zip(grad_y.split(1), x.split(1), mean_nc)])
        return torch.stack(totals), torch.stack(dots)
    centered = x - plane(mean_nc)
    return grad_y.sum(dim=(2, 3), dtype=mean_nc.dtype), (grad_y * centered).sum(dim=(2, 3), dtype=mean_nc.dtype)


def _channel_grad_sums(grad_y: torch.Tensor, x: torch.Tensor,
                       mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Σdy and Σdy·(x − μ) over the whole batch, as (1, C) tensors, for a (1, C) mean μ."""
    if mean.dtype == x.dtype == grad_y.dtype and _kernel_layout(grad_y, x) is not None:
        dot, total = _bn_grad_sums(grad_y, x, mean[0], torch.ones_like(mean[0]))
        return total[None], dot[None]
    centered = x - plane(mean)
    return (grad_y.sum(dim=(0, 2, 3), dtype=mean.dtype)[None],
            (grad_y * centered).sum(dim=(0, 2, 3), dtype=mean.dtype)[None])


def _bn_grad_sums(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                  ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σdy·(x − mean), Σdy) per channel of a (1, C', H, W) tensor in one fused pass: training-mode BN backward with
    1/σ = 1 and γ = 1 (training mode takes 1/σ as given, where eval mode computes a square root per channel)."""
    _, dot, total = torch.ops.aten.native_batch_norm_backward.default(grad_y, x, ones, None, None, mean, ones, True,
                                                                      0.0, [False, True, True])
    return dot, total


@torch.library.custom_op("timm_bninit::state_snapshot", mutates_args=())
def _state_snapshot(state: torch.Tensor) -> torch.Tensor:
    return state.clone()


@_state_snapshot.register_fake
def _(state: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(state)


def read_state(state: torch.Tensor) -> torch.Tensor:
    """A layer buffer's value for a training forward that also overwrites the buffer (blended-σ's σ_prev).

    Why: compiled, AOTAutograd's partitioner may recompute cheap functions of the buffer in the backward graph
    instead of saving them, and so read the buffer *after* the forward wrote the next value into it: silently wrong
    gradients (pytorch/pytorch#197039, open). A clone through an opaque custom op is never recomputed, so its
    output is saved. Eager, the buffer itself is returned (no copy).
    """
    return _state_snapshot(state) if torch.compiler.is_compiling() else state


# Cross-process reductions of the per-channel batch statistics (synchronised RBN / IEBN / blended-σ).


def all_gather_moments(mean: torch.Tensor, var: torch.Tensor, count: int,
                       group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The per-channel mean and biased variance of the union of every process's batch, from each process's own
    (mean, biased variance, element count).

    Every process sends its (count, μ_r, σ²_r) in one all-gather and combines them in the same order, so all agree
    bit for bit: μ = Σ n_r·μ_r / n and σ² = Σ n_r·(σ²_r + (μ_r − μ)²) / n (the law of total variance over processes,
    Chan et al.'s pairwise form). Why not one all-reduce of Σx and Σx²: σ² = Σx²/n − μ² cancels catastrophically in
    float32 when |μ| ≫ σ, which BN's own two-pass statistics avoid; torch's SyncBatchNorm gathers for the same reason.
    """
    channels = mean.shape[0]
    local = torch.cat([mean.new_full((1,), float(count)), mean, var])
    if torch.is_grad_enabled() and local.requires_grad:
        # a layer training through autograd: the differentiable gather sends each process's share of the
        # gradient back to the process whose statistics it came from
        table = torch.stack(dist_nn.all_gather(local, group=group))
    else:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
    counts, means, variances = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    total = counts.sum()
    weights = counts / total
    global_mean = (weights * means).sum(0)
    deviation = means - global_mean
    global_var = (weights * torch.addcmul(variances, deviation, deviation)).sum(0)
    return global_mean, global_var, round(total.item())


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``tensor`` summed over the processes of ``group`` (in place, returned for chaining)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class PlaneAffineFunction(torch.autograd.Function):
    """Training-mode forward and backward of a calibrated layer, ``y = x·A + B'`` where the per-plane (N, C) or
    per-channel (C,) A and B' are functions of the per-(sample, channel) mean m and biased variance v of ``x`` over
    H×W and of the layer's parameters (``layer._batch_coefficients``), back-propagated in closed form by
    ``layer._batch_coefficients_backward``. Returns y and, without gradient, the batch's per-channel μ, biased σ² and
    unbiased σ² for the caller's running-statistics update.

    Why: autograd through ``var_mean`` + ``addcmul`` plus a graph of ~30 small ops cost 3.5-4× BN's forward+backward
    time on CPU. Here the activation-sized work is close to BN's: forward m, then Σ(x − m)², then y; backward Σdy and
    Σdy·(x − m) in one fused pass, then dx = A·dy + P·x + Q with per-plane P and Q (two passes). The (N, C)-sized
    work is a few dozen tensor ops without autograd bookkeeping. Not twice differentiable, and (like BN's running
    statistics update) not usable under ``torch.func`` transforms.

    A layer whose coefficients are per channel, functions of the batch statistics only (blended σ), says so by
    defining ``_batchnorm_backward_coefficients(saved) -> (γ', 1/σ')``: the (γ, 1/σ) with which BN's own
    training-mode backward, at the batch mean, is its input gradient. On a channels_last CPU batch the whole step is
    then BN's kernels on the whole batch, treated as one plane per channel: its statistics in one call, and Σdy,
    Σdy·(x − μ) and dx in one more, as BN's own backward computes them (BN's channels_last kernels reduce a whole
    channel faster than the per-sample calls, and its backward writes dx in one pass instead of two).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Any, *params: torch.Tensor | None) -> torch.Tensor:
        values = [None if p is None else p.detach() for p in params]  # plain tensors: no Parameter dispatch
        ctx.save_for_backward(x)
        ctx.layer, ctx.param_dtypes = layer, [None if p is None else p.dtype for p in params]
        y, mean, var, count = _closed_form_forward(ctx, x, layer, values)
        # the running-statistics update's inputs, returned rather than applied here: the Function has no side
        # effects, and the layer updates its state in its own forward, where nn.BatchNorm2d does
        unbiased_var = var * (count / max(count - 1, 1))
        ctx.mark_non_differentiable(mean, var, unbiased_var)
        return y, mean, var, unbiased_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, *_statistics_grads: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        if ctx.batchnorm_backward is not None and grad_y.dtype == x.dtype and _kernel_layout(grad_y, x) is not None:
            grad_x, param_grads = _batchnorm_step_backward(ctx, grad_y, x)
        else:
            grad_x, param_grads = _closed_form_backward(ctx, grad_y, x)
        return (grad_x, None, *_parameter_grads(ctx, param_grads))


class NativeStepFunction(torch.autograd.Function):
    """A calibrated layer's training step in the C kernels of :mod:`~timm_bninit.native_kernels`: the forward is the
    layer's ``_native_forward`` (one C call, which also updates the running statistics in place, as BN's kernels
    do), the backward one more C call. The same results as :class:`PlaneAffineFunction`, for what the C kernels take
    (a float32/float64 CPU batch in NCHW or channels_last, local statistics, eager).

    Why a Function of its own: a step at ResNet-50's 7×7 stage takes about as long as BN's, so the fixed cost of
    every tensor op and of every Function output weighs; this one returns y alone and makes no tensor op beyond the
    buffers the kernels fill (benchmarks/HISTORY.md, "Less Python per step").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Any, *params: torch.Tensor | None) -> torch.Tensor:
        y, ctx.state = layer._native_forward(x, *params)
        ctx.save_for_backward(x)
        ctx.param_dtypes = [None if p is None else p.dtype for p in params]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x, param_grads = native_kernels.backward(grad_y, x, ctx.state, ctx.needs_input_grad[0])
        return (grad_x, None, *_parameter_grads(ctx, param_grads))


def _parameter_grads(ctx: Any, grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
    """The parameters' gradients in their own dtypes, None for those that need none (or are None)."""
    return [(grad if grad.dtype == dtype else grad.to(dtype)) if needed else None
            for grad, dtype, needed in zip(grads, ctx.param_dtypes, ctx.needs_input_grad[2:])]


def _closed_form_forward(ctx: Any, x: torch.Tensor, layer: Any, values: list[torch.Tensor | None]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """y, the batch's μ and biased σ² and the number of values per channel, from BN's kernels (or the portable tensor
    ops) and the layer's coefficient methods; what the backward needs goes into ``ctx``."""
    whole_batch = hasattr(layer, "_batchnorm_backward_coefficients") and _kernel_layout(x) == torch.channels_last
    if whole_batch:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean_nc, var_nc, plane_size = mean[None], var[None], x.shape[0] * x.shape[2] * x.shape[3]
    else:
        mean_nc, var_nc = plane_moments(x, torch.promote_types(x.dtype, torch.float32))
        plane_size = x.shape[2] * x.shape[3]
    scale, shift, moments, saved = layer._batch_coefficients(mean_nc, var_nc, plane_size, *values)
    ctx.mean_nc, ctx.plane_size, ctx.scale, ctx.saved = mean_nc, plane_size, scale, saved
    # synchronised statistics need the all-reduce between Σdy and dx that BN's fused backward has no room for
    use_bn = whole_batch and moments.group is None
    ctx.batchnorm_backward = layer._batchnorm_backward_coefficients(saved) if use_bn else None
    return plane_affine(x, scale, shift), moments.mean, moments.var, moments.count


def _closed_form_backward(ctx: Any, grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
    mean_nc, scale, plane_size = ctx.mean_nc, ctx.scale, ctx.plane_size
    # in the centred form y = (x − m)·A + B (B = B' + A·m): ∂L/∂A = Σdy·(x − m) and ∂L/∂B = Σdy
    if mean_nc.shape[0] == x.shape[0]:
        grad_shift, grad_scale = plane_grad_sums(grad_y, x, mean_nc)
    else:  # the whole batch as one plane per channel (see the class docstring)
        grad_shift, grad_scale = _channel_grad_sums(grad_y, x, mean_nc)
    grad_mean, grad_var, param_grads = ctx.layer._batch_coefficients_backward(ctx.saved, grad_scale, grad_shift)
    if not ctx.needs_input_grad[0]:
        return None, param_grads
    # y depends on x directly (A·dy), through v (∂v/∂x = 2(x − m)/HW) and through m (∂m/∂x = 1/HW), which enters
    # both A, B and x − m (the latter contributes −A·Σdy):
    # dx = A·dy + P·(x − m) + Q with P = 2·∂L/∂v / HW, Q = (∂L/∂m − A·Σdy) / HW
    coef_x = grad_var * (2.0 / plane_size)
    coef_const = torch.addcmul(grad_mean, scale, grad_shift, value=-1.0).div_(plane_size)
    grad_x = plane_affine(grad_y, scale, coef_const.addcmul_(coef_x, mean_nc, value=-1.0))
    return grad_x.addcmul_(x, plane(coef_x)), param_grads


def _batchnorm_step_backward(ctx: Any, grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
    """dx from BN's training-mode backward with the layer's (γ', 1/σ'), the parameters' gradients from its closed
    form fed with the per-channel sums that the same call returns."""
    weight, invstd = ctx.batchnorm_backward
    grad_x, grad_weight, total = torch.ops.aten.native_batch_norm_backward.default(
        grad_y, x, weight, None, None, ctx.mean_nc[0], invstd, True, 0.0, [ctx.needs_input_grad[0], True, True])
    # BN returns γ's gradient as Σdy·(x − μ)·(1/σ'); the whole batch is one plane per channel (m = μ)
    _, _, param_grads = ctx.layer._batch_coefficients_backward(ctx.saved, (grad_weight / invstd)[None], total[None])
    return grad_x, param_grads
