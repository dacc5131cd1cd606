"""Local sources turned into cached ``DatasetDict``\\ s: official archives, image folders, and builtin demo sets.

A build reads the source's index, decodes every image once (:mod:`.verify`), and saves the official splits with
``image`` (``datasets.Image``), ``label`` (``datasets.ClassLabel`` with the class names), ``file`` (the path
relative to the source root, for tracing a prediction back to its image) and, for CUB and Cars, ``bbox``
(``[x_min, y_min, x_max, y_max]``). The CIFAR python archives hold pixel arrays rather than image files; their build
(:mod:`.cifar`) checks the arrays instead and PNG-encodes them, and ``file`` is ``<batch file>/<row>``. Later loads
memory-map the cache (:mod:`.cache`).

Each way of reading is a :class:`LocalSource`, the ``local`` of a data set's registry entry
(:mod:`timm_bninit.data.registry`): :class:`LocalLayout` (an archive read through an index, or an imagefolder
tree), :class:`CifarArchive` (a CIFAR python archive) and :class:`BuiltinSource` (a set built from a package, such
as the digits). The entry's name keys the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from . import archives, cifar
from .archives import ArchiveIndex
from .cache import build_entry, entry_path, load_entry, source_fingerprint
from .cifar import CifarLayout
from .errors import DatasetError, SkippedFile
from .verify import find_unreadable_images

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["LocalSource", "FolderSource", "LocalLayout", "CifarArchive", "BuiltinSource", "LocalLoad"]


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


class FolderSource(ABC):
    """A data set read from a folder on this machine (``data_dir``): the ``local`` of its registry entry.

    Attributes:
        origin: What :class:`~timm_bninit.data.ImageDatasetInfo` records as the origin.
        hint: What ``data_dir`` must hold, for messages (``data_dir=<hint>``).
    """

    origin: ClassVar[str] = "local"
    hint: str

    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds this layout, for a data set given as a bare folder (no name)."""
        return False

    @abstractmethod
    def find_root(self, data_dir: str | Path) -> Path:
        """The folder the source is read from, given the user's ``data_dir``; DatasetError if it is not there."""

    @abstractmethod
    def load(self, name: str, root: Path, cache_root: Path, skip_corrupt: bool) -> LocalLoad:
        """The official splits of the source at ``root``, from the cache, building the entry on a miss.

        Args:
            name: The data set's registry name; it keys the cache entry.
            root: What :meth:`find_root` returned.
            cache_root: Folder holding the cache entries.
            skip_corrupt: Leave out images that are missing or fail to decode, recording them, instead of failing.
        """


@dataclass(frozen=True)
class LocalLayout(FolderSource):
    """An archive read through its index files, or an imagefolder tree: images decoded once, then cached.

    Attributes:
        locate_root: data dir -> the folder the index's paths are relative to; raises DatasetError if absent.
        index_files: root -> files whose bytes key the cache.
        image_dirs: root -> folders whose listing keys the cache.
        read_index: (root, scratch folder) -> the checked :class:`ArchiveIndex`.
        hint: What ``data_dir`` must hold, e.g. ``'the folder containing CUB_200_2011/'``.
        recognise: folder -> whether it holds this layout; None: a bare folder is never taken for it.
    """

    locate_root: Callable[[str | Path], Path]
    index_files: Callable[[Path], list[Path]]
    image_dirs: Callable[[Path], list[Path]]
    read_index: Callable[[Path, Path], ArchiveIndex]
    hint: str
    recognise: Callable[[Path], bool] | None = None

    def recognises(self, folder: Path) -> bool:
        return self.recognise is not None and self.recognise(folder)

    def find_root(self, data_dir: str | Path) -> Path:
        return self.locate_root(data_dir)

    def load(self, name: str, root: Path, cache_root: Path, skip_corrupt: bool) -> LocalLoad:
        """The official splits, from the cache; a miss parses the index, decodes every image and saves the entry."""
        key = source_fingerprint(name, root, self.index_files(root), self.image_dirs(root))

        def build(work: Path) -> tuple[DatasetDict, list[SkippedFile]]:
            return _build_from_index(self.read_index(root, work), skip_corrupt)

        return _load_or_build(name, key, str(root), cache_root, skip_corrupt, build)


@dataclass(frozen=True)
class CifarArchive(FolderSource):
    """An official CIFAR python archive (see :mod:`.cifar`), PNG-encoded once into the cache.

    The key hashes the bytes of the meta and batch files (about 180 MB: half a second per load, against half a
    minute to build), so a replaced batch file always rebuilds. There are no per-image files, so nothing is skipped:
    a bad batch file fails the build whatever ``skip_corrupt`` says.

    Attributes:
        layout: The archive's folder, files and pickle keys.
    """

    layout: CifarLayout

    @property
    def hint(self) -> str:  # type: ignore[override]
        return f"the folder containing {self.layout.folder}/ (the extracted {self.layout.tarball})"

    def recognises(self, folder: Path) -> bool:
        if (folder / self.layout.folder).is_dir():
            return True
        return all((folder / name).is_file() for name in self.layout.recognised_by)

    def find_root(self, data_dir: str | Path) -> Path:
        return cifar.find_cifar_root(self.layout, data_dir)

    def load(self, name: str, root: Path, cache_root: Path, skip_corrupt: bool) -> LocalLoad:
        key = source_fingerprint(name, root, cifar.cifar_index_files(self.layout, root))
        return _load_or_build(
            name, key, str(root), cache_root, False, lambda work: (cifar.build_cifar_dataset(self.layout, root), [])
        )


@dataclass(frozen=True)
class BuiltinSource:
    """A data set built from an installed package, needing no files (the digits demo set), cached like the archives.

    Attributes:
        source: What it is read from, recorded as the info's ``source`` (``'sklearn.datasets.load_digits'``).
        build: () -> the official splits.
        parameters: () -> everything the built set depends on (package version included); part of its cache key.
        note: How it comes, for the message refusing a ``data_dir`` (``'bundled with scikit-learn'``).
    """

    source: str
    build: Callable[[], DatasetDict]
    parameters: Callable[[], dict[str, Any]]
    note: str

    origin: ClassVar[str] = "builtin"

    def load(self, name: str, cache_root: Path) -> LocalLoad:
        """The built set, from the cache under ``name``, building the entry on a miss."""
        key = source_fingerprint(name, Path(self.source), **self.parameters())
        return _load_or_build(name, key, self.source, cache_root, False, lambda work: (self.build(), []))


# what a registry entry's ``local`` may be
LocalSource = FolderSource | BuiltinSource


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

