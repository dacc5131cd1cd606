"""Tiny fake copies of the official CIFAR-10 and CIFAR-100 python archives (``cifar-10-batches-py/``, ...).

The files are written as the official ones are read: pickled dicts with ``bytes`` keys, ``data`` a uint8 (N, 3072)
array whose row is the red, then the green, then the blue 32x32 plane, each row-major. Every image is a known pattern
(:func:`pattern`): red grows along x (columns), green along y (rows), blue is the image's number, so a test can check
that the planes reached the right channels and the right orientation, and that image and label stayed together.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 32


def pattern(number: int) -> np.ndarray:
    """The HxWxC uint8 image number ``number`` (< 256): R[y, x] = 8x, G[y, x] = 8y, B = number."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([8 * x, 8 * y, np.full_like(x, number)], axis=-1).astype(np.uint8)


def to_row(image: np.ndarray) -> np.ndarray:
    """One row of ``data``: the red plane, then green, then blue, each flattened row by row (the official format)."""
    return np.concatenate([image[:, :, channel].reshape(-1) for channel in range(3)])


@dataclass
class FakeCifar:
    """Where a fake archive lives and what it should load as.

    Attributes:
        data_dir: The folder holding the archive folder (pass it as ``data_dir``).
        root: The archive folder itself (``cifar-10-batches-py/`` or ``cifar-100-python/``).
        class_names: Class names in label order.
        coarse_names: Superclass names (CIFAR-100), else empty.
        train: ``file -> (label, coarse label or None, image)`` of the official train split.
        test: The same for the official test split.
    """

    data_dir: Path
    root: Path
    class_names: list[str]
    coarse_names: list[str] = field(default_factory=list)
    train: dict[str, tuple[int, int | None, np.ndarray]] = field(default_factory=dict)
    test: dict[str, tuple[int, int | None, np.ndarray]] = field(default_factory=dict)

    @property
    def rows(self) -> dict[str, tuple[int, int | None, np.ndarray]]:
        return self.train | self.test


def write_batch(path: Path, content: dict, protocol: int = 2, str_keys: bool = False) -> None:
    """Pickle ``content`` with ``bytes`` keys, as Python 2 wrote the official files (or ``str`` keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keyed = {(key if str_keys else key.encode()): value for key, value in content.items()}
    path.write_bytes(pickle.dumps(keyed, protocol=protocol))


def read_batch(path: Path) -> dict:
    """A fake batch back as a ``str``-keyed dict, for a test to edit and rewrite."""
    return {key.decode(): value for key, value in pickle.loads(path.read_bytes(), encoding="bytes").items()}


def make_cifar10_archive(
    base: Path,
    num_classes: int = 3,
    num_train: int = 4,
    num_test: int = 2,
    protocol: int = 2,
    str_keys: bool = False,
) -> FakeCifar:
    """``base/cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and ``batches.meta``.

    ``num_train`` / ``num_test`` images per class; the training images are dealt round-robin over the five batch
    files, so the classes are interleaved within each file as in the real one.
    """
    root = base / "cifar-10-batches-py"
    names = [f"class{c}" for c in range(num_classes)]
    archive = FakeCifar(base, root, names)
    train_labels = [c for _ in range(num_train) for c in range(num_classes)]
    batches: list[list[int]] = [[] for _ in range(5)]
    for position, label in enumerate(train_labels):
        batches[position % 5].append(label)
    number = 0
    for batch_file, labels in [*((f"data_batch_{i + 1}", b) for i, b in enumerate(batches)),
                               ("test_batch", [c for _ in range(num_test) for c in range(num_classes)])]:
        images = []
        for row, label in enumerate(labels):
            images.append(pattern(number))
            target = archive.test if batch_file == "test_batch" else archive.train
            target[f"{batch_file}/{row:05d}"] = (label, None, images[-1])
            number += 1
        data = np.stack([to_row(image) for image in images]) if images else np.zeros((0, 3072), np.uint8)
        write_batch(root / batch_file, {
            "batch_label": f"fake {batch_file}".encode(),
            "labels": labels,
            "data": data,
            "filenames": [f"img_{row}.png".encode() for row in range(len(labels))],
        }, protocol, str_keys)
    write_batch(root / "batches.meta", {
        "num_cases_per_batch": max(map(len, batches)),
        "label_names": [name.encode() for name in names],
        "num_vis": 3072,
    }, protocol, str_keys)
    return archive


def make_cifar100_archive(
    base: Path, num_classes: int = 4, num_coarse: int = 2, num_train: int = 4, num_test: int = 2
) -> FakeCifar:
    """``base/cifar-100-python/`` with ``train``, ``test`` and ``meta``; class ``c`` belongs to superclass
    ``c % num_coarse``."""
    root = base / "cifar-100-python"
    names = [f"fine{c}" for c in range(num_classes)]
    coarse_names = [f"coarse{c}" for c in range(num_coarse)]
    archive = FakeCifar(base, root, names, coarse_names)
    number = 0
    for split, per_class in (("train", num_train), ("test", num_test)):
        fine = [c for _ in range(per_class) for c in range(num_classes)]
        coarse = [c % num_coarse for c in fine]
        images = []
        for row, (label, superclass) in enumerate(zip(fine, coarse)):
            images.append(pattern(number))
            getattr(archive, split)[f"{split}/{row:05d}"] = (label, superclass, images[-1])
            number += 1
        write_batch(root / split, {
            "filenames": [f"img_{row}.png".encode() for row in range(len(fine))],
            "batch_label": f"{split} batch".encode(),
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": np.stack([to_row(image) for image in images]),
        })
    write_batch(root / "meta", {
        "fine_label_names": [name.encode() for name in names],
        "coarse_label_names": [name.encode() for name in coarse_names],
    })
    return archive
