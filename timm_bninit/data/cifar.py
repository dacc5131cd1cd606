"""The official CIFAR-10 / CIFAR-100 python archives (the layout torchvision also reads), as a ``DatasetDict``.

Layouts, as extracted from ``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz``:

- CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5`` (train, 50,000 images),
  ``test_batch`` (10,000) and ``batches.meta`` (``label_names``).
- CIFAR-100: ``cifar-100-python/`` with ``train`` (50,000), ``test`` (10,000) and ``meta`` (``fine_label_names``,
  ``coarse_label_names``).

Each is a :class:`CifarLayout` in its registry entry (:mod:`.registry`, ``cifar10`` and ``cifar100``).

Each batch file is a pickled dict (written by Python 2, so its keys load as ``bytes`` with ``encoding='bytes'``)
holding ``data``, a uint8 array of shape (N, 3072), and the labels (``labels``; ``fine_labels`` and
``coarse_labels`` for CIFAR-100). A row is one 32x32 image stored as three 1024-value planes, red, green, blue, each
in row-major order. Rows become HxWxC arrays, which ``datasets.Image`` stores as PNG bytes (lossless), so the cached
rows decode to the same PIL images as the hub copies. Building CIFAR-10 takes about half a minute (the PNG encoding)
and then loads from the cache in under a second. The ``file`` column is ``<batch file>/<row>``, e.g.
``data_batch_3/00042``; CIFAR-100 rows also carry ``coarse_label`` (ClassLabel over the 20 superclasses).

The pickles are read by an unpickler that only resolves the few numpy globals an array needs: a batch file holds
only arrays, lists and bytes, and unpickling anything else could run code from the data folder.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .archives import ArchiveIndex, SplitIndex, check_class_coverage
from .errors import DatasetError

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "CifarLayout",
    "find_cifar_root",
    "cifar_index_files",
    "build_cifar_dataset",
]

IMAGE_SIZE = 32
ROW_LENGTH = 3 * IMAGE_SIZE * IMAGE_SIZE


@dataclass(frozen=True)
class CifarLayout:
    """What one CIFAR python archive holds.

    Attributes:
        title: Human-readable name for messages.
        folder: The folder the tarball extracts to.
        tarball: The official download, named in hints.
        meta_file: The pickle holding the class names.
        names_key: Key of the class names in ``meta_file``.
        label_key: Key of the labels in each batch file.
        splits: Official split -> batch files, in order.
        recognised_by: Files that mark a folder as the archive folder itself (CIFAR-100's ``meta`` is a generic
            name, so it comes with ``train``).
        coarse_names_key: Key of the superclass names (CIFAR-100), or None.
        coarse_label_key: Key of the superclass labels in each batch file (CIFAR-100), or None.
    """

    title: str
    folder: str
    tarball: str
    meta_file: str
    names_key: str
    label_key: str
    splits: dict[str, tuple[str, ...]]
    recognised_by: tuple[str, ...]
    coarse_names_key: str | None = None
    coarse_label_key: str | None = None

    @property
    def files(self) -> list[str]:
        """The meta file and every batch file, in a fixed order (their bytes key the cache)."""
        return [self.meta_file, *(name for batches in self.splits.values() for name in batches)]


def find_cifar_root(layout: CifarLayout, data_dir: str | Path) -> Path:
    """The archive folder (``cifar-10-batches-py/`` or ``cifar-100-python/``), given either it or its parent.

    The message for a folder that holds another registered data set says which (:mod:`.loading` adds it).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"{layout.title} data dir {str(data_dir)!r} does not exist or is not a folder")
    if (data_dir / layout.folder).is_dir():
        return (data_dir / layout.folder).resolve()  # its missing files are named by cifar_index_files
    if any((data_dir / name).is_file() for name in layout.files):
        return data_dir.resolve()
    tarball = ""
    if (data_dir / layout.tarball).is_file():
        tarball = f"; {layout.tarball} is there but not extracted: run `tar xzf {layout.tarball}` in that folder"
    raise DatasetError(
        f"no {layout.title} archive in {str(data_dir)!r}: expected {layout.folder}/ (with "
        f"{', '.join(layout.files)}) there, or those files directly; pass the folder that contains {layout.folder}/ "
        f"(the extracted {layout.tarball}) or {layout.folder}/ itself{tarball}"
    )


def cifar_index_files(layout: CifarLayout, root: Path) -> list[Path]:
    """The meta and batch files of the archive at ``root``, in a fixed order; fails naming any that are missing."""
    paths = [root / name for name in layout.files]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DatasetError(
            f"{layout.title} archive {str(root)!r} is missing the file(s) {', '.join(map(repr, missing))} "
            f"(expected {', '.join(layout.files)} there); re-extract {layout.tarball}"
        )
    return paths


def build_cifar_dataset(layout: CifarLayout, root: Path) -> DatasetDict:
    """Read and check every batch file; the official splits with ``image``, ``label`` (, ``coarse_label``), ``file``.

    Raises:
        DatasetError: a file is missing or is not a CIFAR pickle, an entry is missing, ``data`` is not (N, 3072)
            pixels 0..255, a label list does not match the images or holds a label outside the class range, or a
            class has no training images. The message names the file.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, concatenate_datasets

    cifar_index_files(layout, root)
    meta_path = root / layout.meta_file
    meta = _load_batch(meta_path)
    class_names = _class_names(meta, layout.names_key, meta_path)
    label_sets = [("label", layout.label_key, class_names)]
    columns: dict[str, Any] = {"image": Image(), "label": ClassLabel(names=class_names)}
    if layout.coarse_names_key is not None and layout.coarse_label_key is not None:
        coarse_names = _class_names(meta, layout.coarse_names_key, meta_path)
        label_sets.append(("coarse_label", layout.coarse_label_key, coarse_names))
        columns["coarse_label"] = ClassLabel(names=coarse_names)
    columns["file"] = Value("string")

    # pass 1: read and check every file, keeping only its pixels and labels
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, batch_files in layout.splits.items():
        splits[split] = []
        for batch_file in batch_files:
            path = root / batch_file
            batch = _load_batch(path)
            rows: dict[str, Any] = {"image": _pixels(batch, path)}
            for column, key, names in label_sets:
                rows[column] = _labels(batch, key, path, len(rows["image"]), names, layout.meta_file)
            rows["file"] = [f"{batch_file}/{row:05d}" for row in range(len(rows["image"]))]
            splits[split].append(rows)
    # before the slow part (PNG-encoding 60,000 images): a class without training images cannot be stratified
    listed = {name: SplitIndex(files=[], labels=[]) for name in splits}
    for name, parts in splits.items():
        for rows in parts:
            listed[name].files += rows["file"]
            listed[name].labels += rows["label"]
    check_class_coverage(ArchiveIndex(layout.title, root, class_names, listed), f"{layout.title} archive {str(root)!r}")

    # pass 2: encode one batch file at a time, so only one file's PNG bytes exist as Python objects at once
    features = Features(columns)

    def encode(rows: dict[str, Any]) -> Dataset:
        pixels = rows.pop("image")
        return Dataset.from_dict({"image": list(pixels), **rows}, features=features)

    return DatasetDict({name: concatenate_datasets([encode(rows) for rows in parts]) for name, parts in splits.items()})


# ---------------------------------------------------------------------------------------------------------- pickles

# (module, name) an array pickle may reference; numpy 1.x wrote numpy.core, numpy 2 writes numpy._core
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    ("__builtin__", "bytes"),  # ... and empty bytes
    ("builtins", "bytes"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 keeps numpy.core as a shim
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict[str, Any]:
    """A batch or meta pickle as a dict with ``str`` keys (the official files have ``bytes`` keys)."""
    try:
        with open(path, "rb") as file:
            content = _ArrayUnpickler(file, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DatasetError(
            f"{path}: refused to unpickle {err}: a CIFAR batch file holds only numpy arrays, lists and bytes, and "
            "unpickling anything else could run code; replace the file with the one from the official archive"
        ) from None
    except Exception as err:  # garbage or truncated data raises UnpicklingError, EOFError, ValueError, ...
        raise DatasetError(
            f"{path}: cannot read it as a CIFAR python batch file ({type(err).__name__}: {err}); "
            "re-extract the official archive"
        ) from err
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: holds a {type(content).__name__}, expected a dict as in the official archive")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in content.items()}


def _entry(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise DatasetError(
            f"{path}: no {key!r} entry (has {', '.join(map(repr, sorted(content)))}); expected the official CIFAR "
            "python batch format"
        )
    return content[key]


def _pixels(batch: dict[str, Any], path: Path) -> np.ndarray:
    """``data`` (N, 3072) as N HxWxC uint8 images: the row holds the red, then green, then blue 32x32 plane."""
    data = np.asarray(_entry(batch, "data", path))
    if data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        raise DatasetError(
            f"{path}: 'data' has shape {data.shape}; expected (N, {ROW_LENGTH}): one row per image, its "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} pixels as three planes (red, green, blue), each row-major"
        )
    if data.dtype != np.uint8:
        low, high = (int(data.min()), int(data.max())) if data.size and data.dtype.kind in "iu" else (0, 0)
        if data.dtype.kind not in "iu" or low < 0 or high > 255:
            values = f"{data.dtype} values" + (f" in {low}..{high}" if data.dtype.kind in "iu" else "")
            raise DatasetError(f"{path}: 'data' holds {values}; expected uint8 pixel values 0..255")
        data = data.astype(np.uint8)
    planes = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1))


def _labels(
    batch: dict[str, Any], key: str, path: Path, num_images: int, class_names: list[str], names_file: str
) -> list[int]:
    labels = np.asarray(_entry(batch, key, path))
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or len(labels) != num_images:
        raise DatasetError(
            f"{path}: {key!r} holds {labels.size} label(s) for {num_images} image(s) in 'data'; expected one per image"
        )
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {key!r} holds {labels.dtype} values; expected integer class indices")
    num_classes = len(class_names)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(
            f"{path}: {bad.size} label(s) in {key!r} outside 0..{num_classes - 1} ({names_file} lists {num_classes} "
            f"class names), first {int(labels[bad[0]])} at row {int(bad[0])}"
        )
    return labels.tolist()


def _class_names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    raw = _entry(meta, key, path)
    if not isinstance(raw, (list, tuple, np.ndarray)) or len(raw) == 0:
        raise DatasetError(f"{path}: {key!r} should be a non-empty list of class names, got {raw!r:.80}")
    names = [name.decode("utf-8", errors="replace") if isinstance(name, bytes) else str(name) for name in raw]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{path}: {key!r} lists the class name(s) {duplicates} more than once")
    return names
