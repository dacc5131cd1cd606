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

__all__ = ["StepState", "blend_backward", "blend_forward", "iebn_backward", "iebn_forward", "library", "rbn_backward",
           "rbn_forward", "usable"]

_SOURCE = Path(__file__).with_name("plane_kernels.c")
_VERSION = 6  # plane_kernels_version() of the source above
# -fno-trapping-math lets the compiler turn the exponential's clamps into vector min/max (no value changes)
_BASE_FLAGS = ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# with OpenMP the kernels use torch's thread count (and share torch's libgomp, already loaded); a compiler without
# OpenMP (Apple's clang) builds them single-threaded
_FLAG_CHOICES = (["-fopenmp"], [])
_DISABLE_VARIABLE = "TIMM_BNINIT_NATIVE_KERNELS"
# each function's arguments: p a data pointer (None: NULL), i an int64 size, l the layout (int), f a scalar of the
# element type, t the thread count (int)
_SIGNATURES = {
    "rbn_forward": "pl iii ppppp ff ppppp ppp p t",
    "rbn_backward": "ppl iii pppppppp f pppppp p t",
    "iebn_forward": "pl iii pppp ff ppppp ppp p t",
    "iebn_backward": "ppl iii ppppppp f ppppp p t",
    "blend_forward": "pl iii pp ff pppppppp t",
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


# ---- the layers' steps on tensors. The callers (the layers' _native_forward / _native_backward) pass a CPU float32 or
# float64 activation contiguous in NCHW or channels_last (``usable``) and parameters of its dtype, contiguous; the
# checks below only keep a wrong call from reading out of bounds.


class StepState(NamedTuple):
    """What a forward step keeps for its backward (beside the input): the data pointers of its per-plane (N, C) and
    per-channel (C,) values, in the order the backward takes them, and the tensors that hold them.

    RBN, IEBN: plane means m, the calibration's σ(z) and A (N, C); μ and r = 1/sqrt(σ² + ε) (C,). Blended σ: m (N, C);
    A, μ and σ_B = sqrt(σ² + ε) (C,).
    """

    pointers: tuple[int, ...]
    buffers: tuple[torch.Tensor, ...]


def usable(x: torch.Tensor) -> bool:
    """Whether the steps here run on ``x`` (the caller checks that it is not compiling)."""
    return (x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and library() is not None)


def _function(name: str, dtype: torch.dtype) -> Callable[..., None]:
    return getattr(library(), f"{name}_{_SUFFIX[dtype][0]}")


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _rows(buffer: torch.Tensor) -> list[int]:
    """The data pointers of a contiguous buffer's rows (``buffer[k]``), without making a view of each."""
    start, step = buffer.data_ptr(), buffer[0].numel() * buffer.element_size()
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
    return layout, x.shape[0], x.shape[2] * x.shape[3], x.shape[1]


def _gradient_like(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output gradient in x's dtype and memory layout (a copy only when it arrives otherwise, e.g. expanded)."""
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    if grad_y.dtype == x.dtype and grad_y.is_contiguous(memory_format=layout):
        return grad_y
    return grad_y.to(x.dtype).contiguous(memory_format=layout)


def _checked_params(x: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-channel parameters, checked; the caller holds them (a filled one lives only as long as this tuple)."""
    for param in params:
        if param.dtype != x.dtype or not param.is_contiguous() or param.numel() != x.shape[1]:
            raise RuntimeError("plane kernels: every parameter must be a contiguous (C,) tensor of x's dtype")
    return params


def _or_fill(param: torch.Tensor | None, x: torch.Tensor, value: float) -> torch.Tensor:
    """γ or β, or its constant (1, 0) for a layer without affine parameters."""
    return param if param is not None else x.new_full((x.shape[1],), value)


def _backward_buffers(x: torch.Tensor, input_grad: bool, parameters: int
                      ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """dx (or None), the parameters' gradients (C,) and the kernels' scratch (3·N·C + 3·C values; an allocation of its
    own, so that the gradients the parameters keep do not keep it alive)."""
    grad_x = torch.empty_like(x) if input_grad else None
    scratch = x.new_empty(3 * (x.shape[0] + 1) * x.shape[1])
    return grad_x, list(x.new_empty(parameters, x.shape[1]).unbind(0)), scratch


def _calibrated_forward(name: str, x: torch.Tensor, eps: float, factor: float, params: tuple[torch.Tensor, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepState]:
    """RBN's or IEBN's forward, one C call: y, the batch's μ and biased σ², and the backward's state."""
    planes = x.new_empty(5, x.shape[0], x.shape[1])  # m, v, σ(z), A, B' per plane
    channels = x.new_empty(3, x.shape[1])  # μ, σ², r per channel
    y = torch.empty_like(x)
    mean_nc, var_nc, sigmoid, scale, shift = _rows(planes)
    mean, var, inv_std = _rows(channels)
    _function(name, x.dtype)(x.data_ptr(), *_geometry(x), *[p.data_ptr() for p in params], eps, factor, mean_nc,
                             var_nc, sigmoid, scale, shift, mean, var, inv_std, y.data_ptr(), torch.get_num_threads())
    return y, channels[0], channels[1], StepState((mean_nc, sigmoid, scale, mean, inv_std), (planes, channels))


def rbn_forward(x: torch.Tensor, eps: float, factor: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                centering_weight: torch.Tensor, scaling_weight: torch.Tensor, scaling_bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepState]:
    """RBN's training forward: y, the batch's μ and biased σ² (of the calibrated input), and the backward's state."""
    params = _checked_params(x, _or_fill(weight, x, 1.0), _or_fill(bias, x, 0.0), centering_weight, scaling_weight,
                             scaling_bias)
    return _calibrated_forward("rbn_forward", x, eps, factor, params)


def rbn_backward(grad_y: torch.Tensor, x: torch.Tensor, state: StepState, factor: float, weight: torch.Tensor | None,
                 centering_weight: torch.Tensor, scaling_weight: torch.Tensor, input_grad: bool
                 ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """dx (None unless ``input_grad``) and the gradients of (γ, β, w_m, w_v, w_b)."""
    grad_y = _gradient_like(grad_y, x)
    params = _checked_params(x, _or_fill(weight, x, 1.0), centering_weight, scaling_weight)
    grad_x, param_grads, scratch = _backward_buffers(x, input_grad, 5)
    _function("rbn_backward", x.dtype)(grad_y.data_ptr(), x.data_ptr(), *_geometry(x), *state.pointers,
                                        *[p.data_ptr() for p in params], factor,
                                        *map(_pointer, (grad_x, *param_grads, scratch)), torch.get_num_threads())
    return grad_x, tuple(param_grads)


def iebn_forward(x: torch.Tensor, eps: float, factor: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 instance_weight: torch.Tensor, instance_bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepState]:
    """IEBN's training forward: y, the batch's μ and biased σ², and the backward's state."""
    params = _checked_params(x, _or_fill(weight, x, 1.0), _or_fill(bias, x, 0.0), instance_weight, instance_bias)
    return _calibrated_forward("iebn_forward", x, eps, factor, params)


def iebn_backward(grad_y: torch.Tensor, x: torch.Tensor, state: StepState, factor: float,
                  weight: torch.Tensor | None, instance_weight: torch.Tensor, input_grad: bool
                  ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """dx (None unless ``input_grad``) and the gradients of (γ, β, γ̂, β̂)."""
    grad_y = _gradient_like(grad_y, x)
    params = _checked_params(x, _or_fill(weight, x, 1.0), instance_weight)
    grad_x, param_grads, scratch = _backward_buffers(x, input_grad, 4)
    _function("iebn_backward", x.dtype)(grad_y.data_ptr(), x.data_ptr(), *_geometry(x), *state.pointers,
                                         *[p.data_ptr() for p in params], factor,
                                         *map(_pointer, (grad_x, *param_grads, scratch)), torch.get_num_threads())
    return grad_x, tuple(param_grads)


def blend_forward(x: torch.Tensor, eps: float, prev_weight: float, prev_std: torch.Tensor | None,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepState]:
    """Blended σ's forward (σ_B alone where ``prev_std`` is 0, or everywhere when it is None): y, the batch's μ and
    biased σ², and the backward's state."""
    params = _checked_params(x, _or_fill(prev_std, x, 0.0), _or_fill(bias, x, 0.0))
    planes = x.new_empty(2, x.shape[0], x.shape[1])  # m, v per plane
    channels = x.new_empty(5, x.shape[1])  # μ, σ², σ_B, A, B' per channel
    y = torch.empty_like(x)
    mean_nc, var_nc = _rows(planes)
    mean, var, batch_std, scale, shift = _rows(channels)
    _function("blend_forward", x.dtype)(x.data_ptr(), *_geometry(x), *[p.data_ptr() for p in params], eps,
                                         prev_weight, mean_nc, var_nc, mean, var, batch_std, scale, shift,
                                         y.data_ptr(), torch.get_num_threads())
    return y, channels[0], channels[1], StepState((mean_nc, mean, scale, batch_std), (planes, channels))


def blend_backward(grad_y: torch.Tensor, x: torch.Tensor, state: StepState, prev_weight: float,
                   prev_std: torch.Tensor | None, input_grad: bool) -> tuple[torch.Tensor | None, tuple[torch.Tensor]]:
    """dx (None unless ``input_grad``) and β's gradient, σ_prev held constant."""
    grad_y = _gradient_like(grad_y, x)
    (prev_std,) = _checked_params(x, _or_fill(prev_std, x, 0.0))
    grad_x, param_grads, scratch = _backward_buffers(x, input_grad, 1)
    _function("blend_backward", x.dtype)(grad_y.data_ptr(), x.data_ptr(), *_geometry(x), *state.pointers,
                                          prev_std.data_ptr(), prev_weight,
                                          *map(_pointer, (grad_x, *param_grads, scratch)), torch.get_num_threads())
    return grad_x, tuple(param_grads)
