"""The image path from stored bytes to a model's input: decode and augment to uint8 in the DataLoader's workers,
convert to float and normalise on the device.

Workers hand over uint8 (3, H, W) tensors, a quarter of float32's bytes through the workers' shared memory and the
host-to-device copy; :class:`DeviceNormalize` does the rest on the device, as timm's ``PrefetchLoader`` does. Two
pipelines, named by the recipe key ``decode``:

* ``fast``: JPEG bytes decoded by torchvision's libjpeg-turbo decoder, every augmentation step run by
  ``torchvision.transforms.v2`` kernels on uint8 tensors; PNG and the other formats, CMYK JPEGs and whatever that
  decoder refuses are decoded by PIL, as ``datasets`` decodes them, and go on as tensors.
* ``pil``: the pipeline runs had before: ``datasets``' PIL decode and the PIL transforms, then ``PILToTensor``;
  :class:`DeviceNormalize` computes from it, bit for bit, what ``ToTensor`` + ``Normalize`` computed in the worker.

Both come from one torchvision/timm ``Compose`` on RGB PIL images that ends in ``ToTensor`` + ``Normalize`` (what
``timm.data.create_transform`` returns and ``experiment.loaders.build_transforms`` builds), so every augmentation
mode has one definition. ``pil`` keeps its steps; ``fast`` replaces each by a uint8 *twin* that draws its random
parameters through the PIL step's own ``get_params`` (timm's random-resized crop, torchvision's random crop) or the
same ``torch.rand(1)`` (flip), and runs colour jitter as the PIL step itself. For one (seed, epoch, index) both
pipelines therefore take the same crop, flip and jitter; only the resampling rounds differently (benchmarks/HISTORY.md,
"Data path", says by how much).

Example::

    train = uint8_pipeline(create_transform(448, is_training=True), decode="fast")
    image = train(row)                                  # row: {'bytes': ..., 'path': ...}; uint8 (3, 448, 448)
    normalize = DeviceNormalize(train.mean, train.std, device="cuda", channels_last=True)
    inputs = normalize(torch.stack([image]))            # float32 on the device, NHWC
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from ..errors import BNInitValueError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision 0.29 deprecates its decoders for TorchCodec's; without them PIL decodes everything
    decode_jpeg = None

__all__ = ["PIPELINES", "DECODERS", "ImagePipeline", "DeviceNormalize", "decode_pil", "decode_rgb", "uint8_pipeline",
           "uint8_twin"]

PIPELINES = ("fast", "pil")
_JPEG_START = b"\xff\xd8"  # every JPEG file starts with the SOI marker
# resampling the v2 kernels do on uint8 tensors (box and hamming exist for PIL images only)
_TENSOR_INTERPOLATIONS = (T.InterpolationMode.NEAREST, T.InterpolationMode.NEAREST_EXACT,
                          T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC, T.InterpolationMode.LANCZOS)


def decode_pil(value: Any) -> Image.Image:
    """A stored image (``{'bytes', 'path'}``, a path, or an image) decoded as ``datasets`` decodes it (EXIF orientation
    applied), in RGB: CUB and Cars hold a few greyscale and CMYK JPEGs, and every transform expects 3 channels."""
    from datasets import Image as ImageFeature

    if isinstance(value, str):  # datasets' decoder reads a path only inside a dict
        value = {"bytes": None, "path": value}
    return ImageFeature().decode_example(value).convert("RGB")


def _stored_bytes(value: Any) -> bytes | None:
    """The encoded file of a stored image, read from its local file when not embedded; None when only ``datasets``
    can read it (an already decoded image, a remote path)."""
    if isinstance(value, str):
        value = {"bytes": None, "path": value}
    if not isinstance(value, dict):
        return None
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    return Path(path).read_bytes() if path and Path(path).is_file() else None


def decode_rgb(value: Any) -> torch.Tensor:
    """A stored image as a uint8 RGB tensor (3, H, W), with the same pixels as :func:`decode_pil`.

    JPEGs go through torchvision's ``decode_jpeg`` (libjpeg-turbo, EXIF orientation applied as ``datasets`` does);
    a greyscale JPEG's level is copied to the three channels, as PIL's L -> RGB conversion does. Everything else goes
    through PIL: other formats, CMYK and YCCK JPEGs (PIL's CMYK -> RGB conversion, which honours the Adobe marker's
    inversion, is the reference), and JPEGs ``decode_jpeg`` refuses (12-bit, damaged), which PIL may still read or
    refuses with its own error.
    """
    data = _stored_bytes(value)
    if data is not None and data[:2] == _JPEG_START and decode_jpeg is not None:
        try:
            # bytearray: decode_jpeg wants a writable buffer; the copy costs microseconds against a millisecond decode
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED,
                                apply_exif_orientation=True)
        except RuntimeError:
            image = None
        if image is not None and image.shape[0] == 3:
            return image
        if image is not None and image.shape[0] == 1:
            return image.repeat(3, 1, 1)
    return F2.pil_to_tensor(decode_pil(value))


# each pipeline's decoder: stored image -> what its transform takes
DECODERS: dict[str, Callable[[Any], Any]] = {"fast": decode_rgb, "pil": decode_pil}


@dataclass(frozen=True)
class ImagePipeline:
    """How a split's stored images become uint8 model inputs in a worker, and how the device then normalises them.

    Calling it decodes and transforms one stored image; a data set that keeps decoded images calls
    :meth:`decode` once and ``transform`` per access.

    Attributes:
        decode_with: ``fast`` (:func:`decode_rgb`, uint8 tensors) or ``pil`` (:func:`decode_pil`, PIL images).
        transform: Decoded image -> uint8 (3, H, W) tensor; random steps draw from the global generators (torch,
            ``random``), which the data set seeds per sample.
        mean: Per-channel mean (float32 values) that :class:`DeviceNormalize` subtracts from pixel / 255.
        std: Per-channel standard deviation it divides by.
    """

    decode_with: str
    transform: Callable[[Any], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def decode(self, value: Any) -> Any:
        return DECODERS[self.decode_with](value)

    def __call__(self, value: Any) -> torch.Tensor:
        return self.transform(self.decode(value))


class DeviceNormalize:
    """A uint8 batch (B, 3, H, W) as a model's float32 input, computed on the device after a non-blocking copy.

    ``float() / 255``, ``- mean``, ``/ std`` in float32, in that order: the operations of ``ToTensor`` + ``Normalize``
    in the same order, so the values are those a worker used to compute, bit for bit (each is one correctly rounded
    IEEE operation per element, whatever the device and memory layout). The batch is laid out NHWC with
    ``channels_last``, else NCHW, whatever layout collation gave it. Under autocast the input stays float32, as in
    timm's ``train.py`` (its ``PrefetchLoader`` casts to the model's dtype, float32 under AMP): the first convolution
    casts it on the device, and a norm layer first (``input_bn``) sees float32 as before.

    Example::

        normalize = DeviceNormalize(pipeline.mean, pipeline.std, accelerator.device, channels_last=True)
        for images, labels in loader:       # uint8, pinned by the DataLoader
            logits = model(normalize(images))
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                 channels_last: bool = False):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise BNInitValueError(f"DeviceNormalize expects the uint8 batch a pipeline hands over, got "
                                   f"{images.dtype}; build the data set's transform with uint8_pipeline(...)")
        # the layout is set on the uint8 copy, a quarter of the float's bytes; the float ops keep it
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"device={self.device}, memory_format={self.memory_format})")


# ---- the uint8 twins of the PIL steps ------------------------------------------------------------------------------


def _tensor_interpolation(mode: Any, step: Any) -> T.InterpolationMode:
    if mode not in _TENSOR_INTERPOLATIONS:
        raise BNInitValueError(f"decode 'fast' cannot resample uint8 tensors with {mode} ({step}); use an "
                               f"interpolation among {[m.value for m in _TENSOR_INTERPOLATIONS]}, or decode: pil")
    return mode


class _RandomResizedCropTwin:
    """timm's ``RandomResizedCropAndInterpolation`` on a uint8 tensor: the same ``random`` draws (crop box, then the
    interpolation when it is random), the crop resized by v2's antialiased kernel."""

    def __init__(self, source: RandomResizedCropAndInterpolation):
        modes = source.interpolation if isinstance(source.interpolation, (tuple, list)) else [source.interpolation]
        for mode in modes:
            _tensor_interpolation(mode, source)
        self.source = source

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        source = self.source
        top, left, height, width = source.get_params(image, source.scale, source.ratio)
        interpolation = source.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return F2.resized_crop(image, top, left, height, width, list(source.size), interpolation=interpolation,
                               antialias=True)

    def __repr__(self) -> str:
        return f"uint8({self.source!r})"


class _RandomCropTwin:
    """torchvision's ``RandomCrop`` (no padding) on a uint8 tensor: its own ``get_params`` (two ``torch.randint``)."""

    def __init__(self, source: T.RandomCrop):
        if source.padding is not None or source.pad_if_needed:
            raise BNInitValueError(f"decode 'fast' has no uint8 twin of a padding {source}; use decode: pil")
        self.source = source

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F2.crop(image, *T.RandomCrop.get_params(image, self.source.size))

    def __repr__(self) -> str:
        return f"uint8({self.source!r})"


class _HorizontalFlipTwin:
    """torchvision's ``RandomHorizontalFlip``: flipped when the same ``torch.rand(1)`` falls below ``p``."""

    def __init__(self, source: T.RandomHorizontalFlip):
        self.p = source.p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F2.horizontal_flip(image) if torch.rand(1) < self.p else image

    def __repr__(self) -> str:
        return f"uint8(RandomHorizontalFlip(p={self.p}))"


class _ColorJitterTwin:
    """torchvision's ``ColorJitter`` itself, on the uint8 tensor as a PIL image: its draws and PIL's arithmetic, so
    the same input gives the same output in both pipelines. v2's uint8 kernels would be the tensor twin, but they
    round differently and, at 448 px on one core, take ≈ 13 ms where PIL's ``ImageEnhance`` and the two copies take
    ≈ 6 ms (measured here)."""

    def __init__(self, source: T.ColorJitter):
        self.source = source

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F2.pil_to_tensor(self.source(F2.to_pil_image(image)))

    def __repr__(self) -> str:
        return f"uint8({self.source!r})"


def _resize_twin(source: T.Resize) -> v2.Resize:
    # PIL always filters when it shrinks; antialias=True is the same on tensors
    return v2.Resize(source.size, interpolation=_tensor_interpolation(source.interpolation, source),
                     max_size=source.max_size, antialias=True)


# the uint8 twin of each PIL step the augmentation modes use, by class (a subclass finds its base's twin)
_TWINS: dict[type, Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]] = {
    T.Resize: _resize_twin,
    T.CenterCrop: lambda source: v2.CenterCrop(source.size),
    T.RandomCrop: _RandomCropTwin,
    T.RandomHorizontalFlip: _HorizontalFlipTwin,
    T.ColorJitter: _ColorJitterTwin,
    RandomResizedCropAndInterpolation: _RandomResizedCropTwin,
}


def uint8_twin(step: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step of a PIL ``Compose`` as a step on uint8 (3, H, W) tensors, drawing the same random numbers."""
    for cls in type(step).__mro__:
        if cls in _TWINS:
            return _TWINS[cls](step)
    raise BNInitValueError(f"decode 'fast' has no uint8 twin of {step!r} (known: "
                           f"{', '.join(cls.__name__ for cls in _TWINS)}); add one to pipeline._TWINS, or use "
                           f"decode: pil")


def uint8_pipeline(transform: T.Compose, decode: str = "fast") -> ImagePipeline:
    """``transform``, a ``Compose`` on RGB PIL images ending in ``ToTensor`` + ``Normalize``, as a pipeline that hands
    over uint8 and leaves the normalisation to :class:`DeviceNormalize`.

    Args:
        transform: What ``timm.data.create_transform`` (without ``use_prefetcher``) or
            ``experiment.loaders.build_transforms`` returns.
        decode: ``fast`` (torchvision's decoder and v2 uint8 twins of the steps) or ``pil`` (PIL decode, the steps
            as they are, then ``PILToTensor``).
    """
    if decode not in PIPELINES:
        raise BNInitValueError(f"unknown decode {decode!r}; choose one of {', '.join(PIPELINES)}")
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        raise BNInitValueError(f"uint8_pipeline expects a Compose ending in ToTensor and Normalize (what "
                               f"create_transform returns), got {transform!r}")
    geometry, normalize = steps[:-2], steps[-1]
    mean = tuple(torch.as_tensor(normalize.mean, dtype=torch.float32).tolist())  # Normalize's float32 values
    std = tuple(torch.as_tensor(normalize.std, dtype=torch.float32).tolist())
    if decode == "pil":
        return ImagePipeline("pil", T.Compose([*geometry, T.PILToTensor()]), mean, std)
    return ImagePipeline("fast", v2.Compose([uint8_twin(step) for step in geometry]), mean, std)
