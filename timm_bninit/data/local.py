"""Local sources turned into cached ``DatasetDict``\\ s: official archives, image folders, and the digits demo set.

A build reads the source's index, decodes every image once (:mod:`.verify`), and saves the official splits with
``image`` (``datasets.Image``), ``label`` (``datasets.ClassLabel`` with the class names), ``file`` (the path
relative to the source root, for tracing a prediction back to its image) and, for CUB and Cars, ``bbox``
(``[x_min, y_min, x_max, y_max]``). The CIFAR python archives hold pixel arrays rather than image files; their build
(:mod:`.cifar`) checks the arrays instead and PNG-encodes them, and ``file`` is ``<batch file>/<row>``. Later loads
memory-map the cache (:mod:`.cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import archives, cifar, digits, imagefolder
from .archives import ArchiveIndex
from .cache import build_entry, entry_path, load_entry, source_fingerprint
from .errors import DatasetError, SkippedFile
from .verify import find_unreadable_images

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "LocalLayout",
    "LOCAL_LAYOUTS",
    "LocalLoad",
    "load_local_dataset",
    "load_cifar_dataset",
    "load_digits_dataset",
]


@dataclass(frozen=True)
class LocalLayout:
    """How to find, fingerprint and read one kind of local source.

    Attributes:
        find_root: data dir -> the folder the index's paths are relative to; raises DatasetError if absent.
        index_files: root -> files whose bytes key the cache.
        image_dirs: root -> folders whose listing keys the cache.
        read_index: (root, scratch folder) -> the checked :class:`ArchiveIndex`.
    """

    find_root: Callable[[str | Path], Path]
    index_files: Callable[[Path], list[Path]]
    image_dirs: Callable[[Path], list[Path]]
    read_index: Callable[[Path, Path], ArchiveIndex]


LOCAL_LAYOUTS: dict[str, LocalLayout] = {
    "cub": LocalLayout(
        find_root=archives.find_cub_root,
        index_files=archives.cub_index_files,
        image_dirs=lambda root: [root / "images"],
        read_index=lambda root, scratch: archives.read_cub_index(root),
    ),
    "cars": LocalLayout(
        find_root=archives.find_cars_root,
        index_files=archives.cars_index_files,
        image_dirs=lambda root: [root / "cars_train", root / "cars_test"],
        read_index=lambda root, scratch: archives.read_cars_index(root),
    ),
    "imagefolder": LocalLayout(
        find_root=imagefolder.find_imagefolder_root,
        index_files=lambda root: [],
        image_dirs=lambda root: [root],
        read_index=lambda root, scratch: imagefolder.read_imagefolder_index(root, scratch / "hf"),
    ),
}


@dataclass
class LocalLoad:
    """A local data set's official splits and what its build recorded.

    Attributes:
        dataset: ``DatasetDict`` with the official splits (``train``, ``test``, maybe ``validation``).
        source: Resolved root folder (or the builtin source's name).
        class_names: Class names in label order.
        skipped: Files left out by ``skip_corrupt=True``.
        cache_path: The cache entry the splits are memory-mapped from.
        from_cache: Whether the entry existed before this call.
    """

    dataset: DatasetDict
    source: str
    class_names: list[str]
    skipped: list[SkippedFile]
    cache_path: Path
    from_cache: bool


def load_local_dataset(kind: str, data_dir: str | Path, cache_root: Path, skip_corrupt: bool = False) -> LocalLoad:
    """Load a local source from the cache, building (parse, decode every image, save) the entry on a miss.

    Args:
        kind: ``'cub'``, ``'cars'`` or ``'imagefolder'``.
        data_dir: The folder given by the user (see each layout's ``find_root`` for what is accepted).
        cache_root: Folder holding the cache entries.
        skip_corrupt: Leave out images that are missing or fail to decode, recording them, instead of failing.
    """
    layout = LOCAL_LAYOUTS[kind]
    root = layout.find_root(data_dir)
    key = source_fingerprint(kind, root, layout.index_files(root), layout.image_dirs(root))

    def build(work: Path) -> tuple[DatasetDict, list[SkippedFile]]:
        return _build_from_index(layout.read_index(root, work), skip_corrupt)

    return _load_or_build(kind, key, str(root), cache_root, skip_corrupt, build)


def load_cifar_dataset(kind: str, data_dir: str | Path, cache_root: Path) -> LocalLoad:
    """Load an official CIFAR python archive (see :mod:`.cifar`) from the cache, building the entry on a miss.

    The key hashes the bytes of the meta and batch files (about 180 MB: half a second per load, against half a
    minute to build), so a replaced batch file always rebuilds.

    Args:
        kind: ``'cifar10'`` or ``'cifar100'``.
        data_dir: The folder holding ``cifar-10-batches-py/`` (``cifar-100-python/``), or that folder itself.
        cache_root: Folder holding the cache entries.
    """
    root = cifar.find_cifar_root(kind, data_dir)
    key = source_fingerprint(kind, root, cifar.cifar_index_files(kind, root))
    # no per-image files, so nothing to skip: a bad batch file fails the build whatever skip_corrupt says
    return _load_or_build(
        kind, key, str(root), cache_root, False, lambda work: (cifar.build_cifar_dataset(kind, root), [])
    )


def load_digits_dataset(cache_root: Path) -> LocalLoad:
    """The scikit-learn digits demo set (see :mod:`.digits`), cached like the archives."""
    import sklearn

    key = source_fingerprint(
        "digits", Path(digits.DIGITS_SOURCE), sklearn_version=sklearn.__version__, **digits.digits_parameters()
    )
    return _load_or_build(
        "digits", key, digits.DIGITS_SOURCE, cache_root, False, lambda work: (digits.build_digits_dataset(), [])
    )


def _load_or_build(
    kind: str,
    key: str,
    source: str,
    cache_root: Path,
    skip_corrupt: bool,
    build: Callable[[Path], tuple[DatasetDict, list[SkippedFile]]],
) -> LocalLoad:
    cached = load_entry(cache_root, kind, key)
    from_cache = cached is not None
    if cached is None:
        with build_entry(cache_root, kind, key, source) as (scratch, meta):
            dataset, skipped = build(scratch / "work")
            dataset.save_to_disk(str(scratch / "dataset"))
            meta["class_names"] = list(dataset["train"].features["label"].names)
            meta["skipped"] = [file.to_dict() for file in skipped]
        cached = load_entry(cache_root, kind, key)
        if cached is None:
            raise DatasetError(
                f"data set cache entry for {source!r} under {str(cache_root)!r} vanished after it was built; "
                "is another process deleting that folder?"
            )
    dataset, meta = cached
    skipped = [SkippedFile(**file) for file in meta.get("skipped", [])]
    if skipped and not skip_corrupt:
        # the entry was built with skip_corrupt=True; without it this call must fail exactly as a fresh build would
        raise _unreadable_error(Path(source), {file.path: file.reason for file in skipped})
    return LocalLoad(
        dataset, source, list(meta["class_names"]), skipped, entry_path(cache_root, kind, key), from_cache
    )


def _build_from_index(index: ArchiveIndex, skip_corrupt: bool) -> tuple[DatasetDict, list[SkippedFile]]:
    unreadable = find_unreadable_images(index.root, [file for split in index.splits.values() for file in split.files])
    skipped: list[SkippedFile] = []
    if unreadable:
        if not skip_corrupt:
            raise _unreadable_error(index.root, unreadable)
        for name, split in list(index.splits.items()):
            skipped += [SkippedFile(file, name, unreadable[file]) for file in split.files if file in unreadable]
            index.splits[name] = split.select([i for i, file in enumerate(split.files) if file not in unreadable])
        # skipping may have emptied a class; that must still fail rather than silently shrink the label set
        archives.check_class_coverage(index, f"{index.root} after skipping {len(skipped)} unreadable image(s)")
    return _index_to_dataset_dict(index), skipped


def _index_to_dataset_dict(index: ArchiveIndex) -> DatasetDict:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value

    columns: dict[str, Any] = {"image": Image(), "label": ClassLabel(names=index.class_names), "file": Value("string")}
    if index.has_bbox:
        columns["bbox"] = Sequence(Value("float32"), length=4)
    features = Features(columns)
    splits = {}
    for name, split in index.splits.items():
        data: dict[str, list[Any]] = {
            # absolute paths: save_to_disk reads and embeds each file's bytes, so the cache outlives the archive
            "image": [str(index.root / file) for file in split.files],
            "label": split.labels,
            "file": split.files,
        }
        if index.has_bbox:
            data["bbox"] = split.bboxes
        splits[name] = Dataset.from_dict(data, features=features)
    return DatasetDict(splits)


def _unreadable_error(root: Path, unreadable: dict[str, str]) -> DatasetError:
    listed = "; ".join(f"{file}: {reason}" for file, reason in list(unreadable.items())[:10])
    more = f"; ... ({len(unreadable) - 10} more)" if len(unreadable) > 10 else ""
    return DatasetError(
        f"{len(unreadable)} image(s) under {str(root)!r} cannot be read: {listed}{more}. Replace them (re-extract "
        "the archive), or pass skip_corrupt=True to leave them out; skipped files are then listed in the "
        "data set info"
    )

