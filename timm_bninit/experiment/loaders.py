"""Data loading pieces of a run: decoded-image cache, seeded dataset and sampler, transforms, and the loaders.

Augmentation of sample ``i`` in epoch ``e`` is a pure function of (run seed, e, i), and the data order of epoch ``e``
a pure function of (run seed, e): the same for every method, with any number of workers, and after a resume. The
epoch travels with each index (:class:`EpochIndex`, from the sampler, which the main process iterates every epoch),
not as an attribute of the data set, so DataLoader workers persist across epochs instead of being forked anew.

Workers hand over uint8 images (:mod:`timm_bninit.data.pipeline`, chosen by the recipe key ``decode``); the run
converts and normalises them on the device (``DeviceNormalize``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import str_to_interp_mode
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision import transforms as T

from ..data.pipeline import DECODERS, ImagePipeline, uint8_pipeline
from .layout import RunError
from .recipe import Recipe, resize_crop_problem, resize_crop_size
from .seeding import rng_scope, seed_for, seed_globals

__all__ = ["EpochIndex", "SeededImageDataset", "EpochShuffleSampler", "Loaders", "build_transforms", "eval_data_config",
           "build_pipelines", "build_loaders", "decoded_images", "stored_images", "resize_crop_size",
           "yield_cpu_to_training"]

_DECODED: dict[str, list[Any]] = {}  # per process: decoded images of a split, shared by the runs of a sweep worker


def stored_images(rows: Any) -> Any:
    """The split with its ``image`` column undecoded (``{'bytes', 'path'}``), for a pipeline's own decoder."""
    feature = rows.features.get("image") if hasattr(rows, "features") else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


def _split_key(rows: Any) -> str:
    return getattr(rows, "_fingerprint", None) or str(id(rows))


def decoded_images(rows: Any, decode: str = "pil") -> list[Any]:
    """Every image of a ``datasets`` split decoded once in RGB by the ``decode`` pipeline's decoder (PIL images for
    ``pil``, uint8 tensors for ``fast``), memoised per process by the split's fingerprint."""
    key = f"{_split_key(rows)}|{decode}"
    if key not in _DECODED:
        _DECODED[key] = [DECODERS[decode](value) for value in stored_images(rows)["image"]]
    return _DECODED[key]


def transformed_samples(rows: Any, transform: Any, decode: str = "pil") -> list[Any]:
    """Every image of a split through a deterministic transform, once per process (memoised like the decoding)."""
    key = f"{_split_key(rows)}|{decode}|{transform!r}"
    if key not in _DECODED:
        _DECODED[key] = [transform(image) for image in decoded_images(rows, decode)]
    return _DECODED[key]


class EpochIndex(int):
    """A sample index that also says which epoch's augmentation draws it; compares, hashes and indexes as the int.

    Example::

        dataset[EpochIndex(3, epoch=2)]   # sample 3 as epoch 2 augments it, whatever ``dataset.epoch`` says
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> EpochIndex:
        item = super().__new__(cls, index)
        item.epoch = epoch
        return item

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # how the index reaches a DataLoader worker
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"

    def __str__(self) -> str:  # the number, as for an int (int's str would otherwise be this repr)
        return int.__repr__(self)


class SeededImageDataset(Dataset):
    """A ``datasets`` split whose transform of sample ``i`` in epoch ``e`` draws from the stream (seed, e, i).

    Augmentation is then a pure function of the run seed, the epoch and the index: the same for every method, the
    same with any number of workers, and the same after a resume. The epoch is the index's own when it is an
    :class:`EpochIndex` (what :class:`EpochShuffleSampler` yields), else the ``epoch`` attribute. ``transform`` is an
    :class:`~timm_bninit.data.pipeline.ImagePipeline` (its decoder and uint8 transform), or any callable on the RGB
    PIL image as ``datasets`` decodes it. ``classes`` keeps a subset of the classes, relabelled 0..k-1 in the given
    order; ``preload`` decodes every image once instead of on every access, and without a seed (a transform that
    draws nothing) also transforms it once.
    """

    def __init__(self, rows: Any, transform: Any, seed: int | None, classes: list[int] | None = None,
                 preload: bool = False):
        self.decode_with = transform.decode_with if isinstance(transform, ImagePipeline) else "pil"
        self.transform = transform.transform if isinstance(transform, ImagePipeline) else transform
        self.rows, self.seed, self.epoch = stored_images(rows), seed, 0
        labels = rows["label"]
        if classes is None:
            self.indices, self.labels = list(range(len(labels))), list(labels)
        else:
            relabel = {original: new for new, original in enumerate(classes)}
            self.indices = [i for i, label in enumerate(labels) if label in relabel]
            self.labels = [relabel[labels[i]] for i in self.indices]
        self.images = decoded_images(rows, self.decode_with) if preload else None
        self.prepared = (transformed_samples(rows, self.transform, self.decode_with) if preload and seed is None
                         else None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.indices[index]
        if self.prepared is not None:
            return self.prepared[row], self.labels[index]
        image = self.images[row] if self.images is not None else DECODERS[self.decode_with](self.rows[row]["image"])
        if self.seed is None:
            return self.transform(image), self.labels[index]
        seed = seed_for(self.seed, "augment", getattr(index, "epoch", self.epoch), int(index))
        if get_worker_info() is not None:
            # in a DataLoader worker every draw is this data set's and each one is seeded here, so nothing needs
            # the state restored; skipping it saves numpy's state copies, ~0.35 of the scope's 0.4 ms per sample
            seed_globals(seed)
            return self.transform(image), self.labels[index]
        with rng_scope(seed):  # the main process (num_workers=0): the training loop's own draws must not move
            return self.transform(image), self.labels[index]


class EpochShuffleSampler(Sampler[EpochIndex]):
    """A random order per epoch drawn from the stream (seed, epoch): identical across methods and after resume.

    Yields :class:`EpochIndex` items, so the epoch reaches the data set with each index, in whichever process.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        generator = torch.Generator().manual_seed(seed_for(self.seed, "data-order", epoch))
        return iter([EpochIndex(index, epoch) for index in torch.randperm(self.size, generator=generator).tolist()])


def _squash_crop_pct(size: int, resize: int) -> float:
    """The ``crop_pct`` with which timm's ``squash`` crop mode resizes to ``resize``×``resize`` before cutting ``size``
    (timm resizes to ``floor(size / crop_pct)``; ``size / resize`` may round to a quotient just under ``resize``)."""
    crop_pct = size / resize
    while math.floor(size / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def eval_data_config(config: Recipe, model: nn.Module) -> dict[str, Any]:
    """The evaluation transform of a run as timm's data config: ``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``. ``timm.data.create_transform(**config)`` rebuilds it (a ``resize<S>_crop`` is timm's
    ``squash`` mode with ``crop_pct = img_size / S``); with ``input_bn`` mean 0 and std 1 keep the [0, 1] pixels.
    """
    data_config = resolve_model_data_config(model)
    if config.input_bn:
        data_config.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    size, resize = config.img_size, resize_crop_size(config.augmentation)
    if resize is None:
        crop_pct, crop_mode = (data_config["crop_pct"] if size >= 128 else 1.0), "center"
    else:
        crop_pct, crop_mode = _squash_crop_pct(size, resize), "squash"
    return {"input_size": (data_config["input_size"][0], size, size), "interpolation": data_config["interpolation"],
            "mean": tuple(data_config["mean"]), "std": tuple(data_config["std"]), "crop_pct": crop_pct,
            "crop_mode": crop_mode}


def build_transforms(config: Recipe, model: nn.Module) -> tuple[Any, Any]:
    """Train and eval transforms: timm's (``resolve_model_data_config`` + ``create_transform``), or the fine-grained
    baselines' ``resize<S>_crop``.

    ``resize<S>_crop`` resizes to S×S (aspect ratio not kept), takes a random ``img_size`` crop and flips it
    horizontally with probability 1/2, with no colour jitter; eval resizes to S×S and takes the centre crop. This is
    mmclassification's ResNet-50 CUB/Cars pipeline (``Resize(size=S)`` is S×S there), built from torchvision
    transforms because timm's training transforms (RRC, ``ResizeKeepRatio``) resize to the crop size itself, never
    to a fixed larger S. With ``input_bn`` the images stay [0, 1] pixels (mean 0, std 1): the model's input BN
    normalises them. The eval transform is :func:`eval_data_config`'s, which a run records beside its weights.
    """
    data_config = eval_data_config(config, model)
    size, resize = config.img_size, resize_crop_size(config.augmentation)
    if resize is not None:
        problem = resize_crop_problem(config.augmentation, size)
        if problem is not None:
            raise RunError(f"augmentation {problem}")
        interpolation = str_to_interp_mode(data_config["interpolation"])
        to_tensor = [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
        train_transform = T.Compose([T.Resize((resize, resize), interpolation=interpolation), T.RandomCrop(size),
                                     T.RandomHorizontalFlip(), *to_tensor])
        eval_transform = T.Compose([T.Resize((resize, resize), interpolation=interpolation), T.CenterCrop(size),
                                    *to_tensor])
        return train_transform, eval_transform
    eval_transform = create_transform(input_size=(3, size, size), is_training=False, mean=data_config["mean"],
                                      std=data_config["std"], interpolation=data_config["interpolation"],
                                      crop_pct=data_config["crop_pct"])
    if config.augmentation == "rrc":
        train_transform = create_transform(input_size=(3, size, size), is_training=True, mean=data_config["mean"],
                                           std=data_config["std"], interpolation=data_config["interpolation"])
    elif config.augmentation == "flip":
        train_transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomHorizontalFlip(),
                                     T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])
    else:
        train_transform = eval_transform
    return train_transform, eval_transform


def build_pipelines(config: Recipe, model: nn.Module) -> tuple[ImagePipeline, ImagePipeline]:
    """The train and eval transforms of :func:`build_transforms` as uint8 pipelines of the recipe's ``decode``: the
    same crops, flips and jitter, decoded and augmented to uint8 in the workers, normalised on the device."""
    train_transform, eval_transform = build_transforms(config, model)
    return uint8_pipeline(train_transform, config.decode), uint8_pipeline(eval_transform, config.decode)


@dataclass
class Loaders:
    train: DataLoader
    validation: DataLoader | None
    test: DataLoader
    calibration: DataLoader
    train_dataset: SeededImageDataset
    train_sampler: EpochShuffleSampler


def yield_cpu_to_training(worker_id: int) -> None:
    """``worker_init_fn`` of a run on the CPU: the worker runs when a core would otherwise idle (``SCHED_IDLE``).

    A worker needs little (≈ 0.4 ms of decode and augmentation per sample, ≈ 3 % of a resnet18 step's CPU here), but
    each time it preempts one of the training process's OpenMP threads, the other thread waits for it at the next
    barrier, so at equal priority that share can cost the step more than its own size. At idle priority it runs
    while the training threads wait, which they do for any batch not yet ready, so the loader cannot fall behind
    for long. Whole runs were 3-12 % faster (benchmarks/README.md). Nothing a worker computes depends on when it runs.
    Elsewhere than Linux: the lowest ``nice`` instead.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.nice(19)


def build_loaders(config: Recipe, data: Any, train_transform: Any, eval_transform: Any) -> Loaders:
    """The run's loaders over ``data``'s splits; the transforms are :func:`build_pipelines`' (or any
    :class:`SeededImageDataset` takes)."""
    seed, batch, workers = config.seed, config.batch_size, config.num_workers
    subset = {"classes": config.classes, "preload": config.preload}
    # without augmentation the transform draws nothing: skip the per-sample random-state scope
    train = SeededImageDataset(data["train"], train_transform, None if config.augmentation == "none" else seed,
                               **subset)
    sampler = EpochShuffleSampler(len(train), seed)
    # workers persist across epochs (and evaluations): the epoch reaches them inside each index, not by attribute
    cuda = torch.cuda.is_available()
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": cuda}
    if not cuda:  # training on the CPU: the workers share its cores with the training threads
        common["worker_init_fn"] = yield_cpu_to_training
    if len(train) < batch:
        raise RunError(f"the training split has {len(train)} images, fewer than batch_size={batch}; lower "
                       f"batch_size (--set batch_size=...)")
    train_loader = DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True, **common)

    def evaluation(split: str) -> DataLoader:
        return DataLoader(SeededImageDataset(data[split], eval_transform, None, **subset), batch_size=batch,
                          shuffle=False, **common)

    validation = evaluation("validation") if "validation" in data and len(data["validation"]) else None
    # BN recalibration batches: training images with eval transforms, fixed order -> deterministic
    calibration = DataLoader(SeededImageDataset(data["train"], eval_transform, None, **subset), batch_size=batch,
                             shuffle=False, drop_last=True, **common)
    return Loaders(train_loader, validation, evaluation("test"), calibration, train, sampler)
