"""The fused C plane kernels (``plane_kernels.c``) of the calibrating layers on channels_last CPU batches: built at
first use with the system's C compiler, cached, and called through ctypes.

Why C: on a channels_last batch no stock op computes the per-(sample, channel) moments and gradient sums of a
whole batch at once (BN's kernels reduce over the batch, so they take one call per sample), nor the input gradient
``dx = A·dy + P·(x − m) + Q`` in one pass (stock ops take two). Those per-sample calls and the extra pass made RBN
and IEBN 1.2-1.7× BN's time at ResNet-50's later stages (benchmarks/HISTORY.md, "Both memory formats").

Why plain C through ctypes rather than a torch C++ extension: the source includes no Python or torch header, so it
compiles in about a second (a ``torch.utils.cpp_extension`` build of the same kernels takes a minute here and needs
ninja), needs nothing but a C compiler, and does not depend on torch's C++ ABI. The price is that the callers here
check what a C++ op would: CPU, float32/float64, the memory layout; :mod:`~timm_bninit.norm_kernels` calls these
functions only for tensors that pass those checks.

Without a working compiler (or with ``TIMM_BNINIT_NATIVE_KERNELS=0``) :func:`library` returns None, after one
warning, and the layers take BN's per-sample kernels instead: same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["Running", "StepState", "backward", "blend_forward", "iebn_forward", "library", "rbn_forward", "usable"]

_SOURCE = Path(__file__).with_name("plane_kernels.c")
_VERSION = 7  # plane_kernels_version() of the source above
# -fno-trapping-math lets the compiler turn the exponential's clamps into vector min/max (no value changes)
_BASE_FLAGS = ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# with OpenMP the kernels use torch's thread count (and share torch's libgomp, already loaded); a compiler without
# OpenMP (Apple's clang) builds them single-threaded
_FLAG_CHOICES = (["-fopenmp"], [])
_DISABLE_VARIABLE = "TIMM_BNINIT_NATIVE_KERNELS"
# each function's arguments: p a data pointer (None: NULL), i an int64 size, l the layout (int), f a scalar of the
# element type, t the thread count (int)
_SIGNATURES = {
    "rbn_forward": "pl iii ppppp ff ppppp ppp p ppf t",
    "rbn_backward": "ppl iii pppppppp f pppppp p t",
    "iebn_forward": "pl iii pppp ff ppppp ppp p ppf t",
    "iebn_backward": "ppl iii ppppppp f ppppp p t",
    "blend_forward": "pl iii pp ff pp ppppp p ppf t",
    "blend_backward": "ppl iii ppppp f pp p t",
    "sigmoid": "p i p",
}
_SUFFIX = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}

_library: ctypes.CDLL | None = None
_tried = False


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call (about a second) and cached; None when they cannot be built
    (one warning says why) or ``TIMM_BNINIT_NATIVE_KERNELS=0``."""
    global _library, _tried
    if not _tried:
        _tried = True
        if os.environ.get(_DISABLE_VARIABLE, "1") != "0":
            try:
                _library = _load(_build())
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                warnings.warn(f"timm_bninit: the C plane kernels could not be built ({reason}); RBN, IEBN and "
                              f"blended-σ layers on channels_last CPU tensors take slower stock kernels (same "
                              f"results). Install a C compiler (cc/gcc) to get them, or set "
                              f"{_DISABLE_VARIABLE}=0 to silence this.", RuntimeWarning, stacklevel=3)
    return _library


def _compiler() -> list[str]:
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(command)
    if not words or shutil.which(words[0]) is None:
        fallback = next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
        if fallback is None:
            raise RuntimeError("no C compiler found (tried $CC, Python's CC, cc, gcc, clang)")
        words = [fallback]
    return words[:1]  # Python's CC may carry flags for building Python itself (e.g. -pthread); keep the program


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "timm_bninit" / "kernels"


def _build() -> Path:
    """Compile ``plane_kernels.c`` into the cache (once per source, compiler and platform) and return the library.

    A cached library is reused; a new one is written under a temporary name and renamed into place, so that
    processes building at the same time (the ranks of one job) never load a half-written file.
    """
    compiler = _compiler()
    source = _SOURCE.read_bytes()
    errors = []
    for extra in _FLAG_CHOICES:
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(compiler + flags).encode(), platform.machine().encode(),
                                         sys.platform.encode()])).hexdigest()[:16]
        # an unwritable cache: a private temporary directory (never a shared, guessable path to load code from)
        for directory in (_cache_dir(), None):
            try:
                directory = directory or Path(tempfile.mkdtemp(prefix="timm_bninit-kernels-"))
                target = directory / f"plane_kernels-{key}.so"
                if target.exists():
                    return target
                directory.mkdir(parents=True, exist_ok=True)
                partial = directory / f".{target.name}.{os.getpid()}.tmp"
            except OSError as error:
                errors.append(str(error))
                continue
            run = subprocess.run([*compiler, *flags, str(_SOURCE), "-o", str(partial), "-lm"], capture_output=True,
                                 text=True, timeout=300)
            if run.returncode == 0:
                os.replace(partial, target)
                return target
            partial.unlink(missing_ok=True)
            errors.append(run.stderr.strip() or f"{compiler[0]} exited with {run.returncode}")
            break  # the compiler refused these flags: a writable directory would not help
    raise RuntimeError(errors[-1] if errors else "no build attempted")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.plane_kernels_version() != _VERSION:
        raise RuntimeError(f"{path} is not version {_VERSION} of plane_kernels.c")
    for name, signature in _SIGNATURES.items():
        for suffix, scalar in _SUFFIX.values():
            types = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "l": ctypes.c_int, "f": scalar, "t": ctypes.c_int}
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes = [types[code] for code in signature.replace(" ", "")]
            function.restype = None
    return lib


# ---- the layers' steps on tensors. The callers (the layers' _native_forward and the autograd Function that runs the
# step) pass a CPU float32 or float64 activation contiguous in NCHW or channels_last (``usable``) and parameters of
# its dtype, contiguous; the checks below only keep a wrong call from reading or writing out of bounds.


class Running(NamedTuple):
    """The running statistics a training forward folds its batch's μ and unbiased σ² into, in place, with weight
    ``momentum`` (as ``nn.BatchNorm2d``: ``r ← r + momentum·(b − r)``)."""

    mean: torch.Tensor
    var: torch.Tensor
    momentum: float


class StepState(NamedTuple):
    """What a forward step keeps for its backward (beside the input): the backward's C function, its arguments
    between the input and the gradients (the geometry, the data pointers of the per-plane (N, C) and per-channel
    (C,) values and of the parameters, a scalar), how many parameter gradients it writes, and the tensors those
    pointers point into.

    RBN, IEBN: plane means m, the calibration's σ(z) and A (N, C); μ and r = 1/sqrt(σ² + ε) (C,). Blended σ: m (N, C);
    μ, A and σ_B = sqrt(σ² + ε) (C,), and σ_prev as the step read it.
    """

    backward: Callable[..., None]
    arguments: tuple[int | float | None, ...]
    gradients: int
    buffers: tuple[torch.Tensor, ...]


def usable(x: torch.Tensor, *running: torch.Tensor | None) -> bool:
    """Whether the steps here run on ``x`` and update the ``running`` statistics buffers given (None: none), which
    the forward call writes in place: x's dtype, contiguous. (The caller checks that it is not compiling.)"""
    return (x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and all(r is None or (r.dtype == x.dtype and r.is_contiguous()) for r in running)
            and library() is not None)


def _function(name: str, dtype: torch.dtype) -> Callable[..., None]:
    return getattr(library(), f"{name}_{_SUFFIX[dtype][0]}")


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _rows(buffer: torch.Tensor) -> list[int]:
    """The data pointers of a contiguous buffer's rows (``buffer[k]``), without making a view of each."""
    start, step = buffer.data_ptr(), buffer.numel() // buffer.shape[0] * buffer.element_size()
    return [start + k * step for k in range(buffer.shape[0])]


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(layout, N, H·W, C): layout 0 for NCHW-contiguous (first: a tensor with C = 1 or H·W = 1 is in both formats,
    with the same memory order), 1 for channels_last."""
    if x.dtype not in _SUFFIX or x.dim() != 4:
        raise RuntimeError(f"plane kernels need a 4-D float32/float64 tensor, got {x.dtype} {tuple(x.shape)}")
    if x.is_contiguous():
        layout = 0
    elif x.is_contiguous(memory_format=torch.channels_last):
        layout = 1
    else:
        raise RuntimeError(f"plane kernels need an NCHW or channels_last tensor, got strides {x.stride()}")
    batch, channels, height, width = x.shape
    return layout, batch, height * width, channels


def _gradient_like(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output gradient in x's dtype and memory layout (a copy only when it arrives otherwise, e.g. expanded)."""
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    if grad_y.dtype == x.dtype and grad_y.is_contiguous(memory_format=layout):
        return grad_y
    return grad_y.to(x.dtype).contiguous(memory_format=layout)


def _checked_params(x: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-channel parameters, checked; the caller holds them (a filled one lives only as long as this tuple)."""
    dtype, channels = x.dtype, x.shape[1]
    for param in params:
        if param.dtype != dtype or not param.is_contiguous() or param.numel() != channels:
            raise RuntimeError("plane kernels: every parameter must be a contiguous (C,) tensor of x's dtype")
    return params


def _or_fill(param: torch.Tensor | None, x: torch.Tensor, value: float) -> torch.Tensor:
    """γ or β, or its constant (1, 0) for a layer without affine parameters."""
    return param if param is not None else x.new_full((x.shape[1],), value)


def _forward(name: str, x: torch.Tensor, params: tuple[torch.Tensor, ...], scalars: tuple[float, float],
             plane_rows: int, channel_rows: int, running: Running | None
             ) -> tuple[torch.Tensor, tuple[int, int, int, int], list[int], list[int], tuple[torch.Tensor, ...]]:
    """One forward call, which also updates ``running`` in place (its buffers in x's dtype, see :func:`usable`): y,
    the geometry, the data pointers of the per-plane and per-channel rows the C function wrote and the buffers that
    hold them."""
    geometry = _geometry(x)
    _, batch, _, channels = geometry
    planes, per_channel = x.new_empty(plane_rows, batch, channels), x.new_empty(channel_rows, channels)
    y = torch.empty_like(x)
    buffers = (None, None) if running is None else _checked_params(x, running.mean, running.var)
    plane_pointers, channel_pointers = _rows(planes), _rows(per_channel)
    _function(name, x.dtype)(x.data_ptr(), *geometry, *[p.data_ptr() for p in params], *scalars, *plane_pointers,
                             *channel_pointers, y.data_ptr(), *map(_pointer, buffers),
                             0.0 if running is None else running.momentum, torch.get_num_threads())
    return y, geometry, plane_pointers, channel_pointers, (planes, per_channel)


def backward(grad_y: torch.Tensor, x: torch.Tensor, state: StepState, input_grad: bool
             ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Any layer's backward, one C call: dx (None unless ``input_grad``) and the parameters' gradients (C,) each, in
    the order the layer's forward took the parameters."""
    grad_y = _gradient_like(grad_y, x)
    grad_x = torch.empty_like(x) if input_grad else None
    grads = x.new_empty(state.gradients, x.shape[1])
    # the kernels' scratch (3·N·C + 3·C values): an allocation of its own, so that the gradients the parameters keep
    # do not keep it alive
    scratch = x.new_empty(3 * (x.shape[0] + 1) * x.shape[1])
    state.backward(grad_y.data_ptr(), x.data_ptr(), *state.arguments, _pointer(grad_x), *_rows(grads),
                   scratch.data_ptr(), torch.get_num_threads())
    return grad_x, grads.unbind(0)


def rbn_forward(x: torch.Tensor, eps: float, factor: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                centering_weight: torch.Tensor, scaling_weight: torch.Tensor, scaling_bias: torch.Tensor,
                running: Running | None = None) -> tuple[torch.Tensor, StepState]:
    """RBN's training forward (updating ``running``, when given, with the calibrated input's μ and σ²): y and the
    state from which :func:`backward` computes dx and the gradients of (γ, β, w_m, w_v, w_b)."""
    params = _checked_params(x, _or_fill(weight, x, 1.0), _or_fill(bias, x, 0.0), centering_weight, scaling_weight,
                             scaling_bias)
    y, geometry, (mean_nc, _, sigmoid, scale, _), (mean, _, inv_std), buffers = _forward(
        "rbn_forward", x, params, (eps, factor), 5, 3, running)
    gamma, _, centering_weight, scaling_weight, _ = params
    arguments = (*geometry, mean_nc, sigmoid, scale, mean, inv_std, gamma.data_ptr(), centering_weight.data_ptr(),
                 scaling_weight.data_ptr(), factor)
    return y, StepState(_function("rbn_backward", x.dtype), arguments, 5, (*buffers, *params))


def iebn_forward(x: torch.Tensor, eps: float, factor: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 instance_weight: torch.Tensor, instance_bias: torch.Tensor, running: Running | None = None
                 ) -> tuple[torch.Tensor, StepState]:
    """IEBN's training forward (updating ``running``, when given): y and the state from which :func:`backward`
    computes dx and the gradients of (γ, β, γ̂, β̂)."""
    params = _checked_params(x, _or_fill(weight, x, 1.0), _or_fill(bias, x, 0.0), instance_weight, instance_bias)
    y, geometry, (mean_nc, _, sigmoid, scale, _), (mean, _, inv_std), buffers = _forward(
        "iebn_forward", x, params, (eps, factor), 5, 3, running)
    gamma, _, instance_weight, _ = params
    arguments = (*geometry, mean_nc, sigmoid, scale, mean, inv_std, gamma.data_ptr(), instance_weight.data_ptr(),
                 factor)
    return y, StepState(_function("iebn_backward", x.dtype), arguments, 4, (*buffers, *params))


def blend_forward(x: torch.Tensor, eps: float, prev_weight: float, prev_std: torch.Tensor | None,
                  bias: torch.Tensor | None, running: Running | None = None,
                  next_prev_std: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
    """Blended σ's forward (σ_B alone where ``prev_std`` is 0, or everywhere when it is None), updating ``running``
    when given and writing this batch's σ_B into ``next_prev_std`` when given: y and the state from which
    :func:`backward` computes dx and β's gradient, σ_prev held constant (the caller passes a ``prev_std`` that the
    step does not overwrite)."""
    params = _checked_params(x, _or_fill(prev_std, x, 0.0), _or_fill(bias, x, 0.0))
    y, geometry, (mean_nc, _), (mean, _, batch_std, scale, _), buffers = _forward(
        "blend_forward", x, params, (eps, prev_weight), 2, 5, running)
    if next_prev_std is not None:
        next_prev_std.copy_(buffers[1][2])
    arguments = (*geometry, mean_nc, mean, scale, batch_std, params[0].data_ptr(), prev_weight)
    return y, StepState(_function("blend_backward", x.dtype), arguments, 1, (*buffers, *params))
