"""The data sets by name: one declarative :class:`DatasetSpec` each, and everything else looks them up here.

A name (or an alias such as ``cub200``) stands for one entry: its class count and official split sizes, its Hugging
Face hub copy (repository, pinned commit, the Parquet files of each official split, column renames) and the local
layout it can be read from (an archive read through its index, an imagefolder tree, a CIFAR python archive, or a
builtin set such as the digits) with what ``data_dir`` must hold. :func:`~timm_bninit.data.resolve_source`,
:func:`~timm_bninit.data.load_image_dataset`, the hub and local readers, the recipe checks and
``build_training``'s sizes all read the entry, so a data set is declared once. Registered here: ``cub``, ``cars``,
``digits``, ``imagefolder``, ``cifar10``, ``cifar100``.

Adding a data set
-----------------
Declare an entry and register it, in any module imported before the data are loaded (a recipe names it like any
other)::

    from timm_bninit.data.registry import DatasetSpec, HubCopy, register_dataset

    register_dataset(DatasetSpec(
        name="flowers102",
        title="Oxford Flowers-102",
        aliases=("flowers",),
        num_classes=102,
        split_sizes={"train": 1020, "validation": 1020, "test": 6149},  # the official splits, validation included
        hub=HubCopy(
            "<owner>/<repository>",
            "<full commit id>",  # pinned: a later push to the repository cannot change a run's data unnoticed
            data_files={split: f"data/{split}-*.parquet" for split in ("train", "validation", "test")},
            column_renames={"img": "image"},  # to this project's columns: image, label (a ClassLabel)
        ),
    ))

What each field does:

- ``split_sizes`` lists the source's official splits. A ``validation`` split there is loaded and used as it is;
  without one, validation is a stratified ``val_fraction`` of train (:mod:`.splits`). The hub loader checks every
  listed split's size and that every class occurs in it, and ``build_training`` computes updates per epoch from
  them without loading anything.
- ``hub`` names the Parquet files of each split (``data_files``), so nothing else in the repository (corrupted
  copies, other configs) is downloaded; ``check_sizes=False`` reads a copy whose layout has not been checked yet as
  it is (class coverage is still checked).
- ``local`` reads the data set from a folder given as ``data_dir``: :class:`LocalLayout` (an index reader such as
  :func:`~timm_bninit.data.archives.read_cub_index`, or :data:`IMAGEFOLDER_LAYOUT` for a
  ``train/<class>/<image>`` tree), :class:`CifarArchive` or :class:`BuiltinSource`. A ``recognise`` function lets a
  bare folder be taken for the data set. An entry may have a hub copy, a local source, or both.

Registering an existing name again replaces the entry with a warning. A combination the entry cannot serve (a
``data_dir`` for a hub-only entry or a builtin set, no ``data_dir`` for an entry without a hub copy) is refused by
``resolve_source`` in one line.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import did_you_mean
from . import archives, digits, imagefolder
from .cifar import CifarLayout
from .errors import DatasetError
from .local import BuiltinSource, CifarArchive, FolderSource, LocalLayout, LocalSource

__all__ = [
    "DatasetSpec",
    "HubCopy",
    "LocalLayout",
    "CifarArchive",
    "CifarLayout",
    "BuiltinSource",
    "IMAGEFOLDER_LAYOUT",
    "register_dataset",
    "get_dataset",
    "find_dataset",
    "list_datasets",
    "recognise_folder",
]

SPLIT_ORDER = ("train", "validation", "test")


@dataclass(frozen=True)
class HubCopy:
    """A Hugging Face hub repository holding a data set as Parquet files, and what to read from it.

    Attributes:
        repo: Hub dataset id (``owner/name``), or a local folder laid out like that repository (tests use one; it is
            read by the same ``datasets.load_dataset`` call, which ignores the revision for a folder).
        revision: Commit the copy is pinned to; None for the repository's default branch.
        data_files: ``split -> glob`` of the Parquet files of each official split, relative to the repository root;
            None lets ``datasets`` read the splits the repository declares (the official ones are then selected).
        column_renames: ``hub column -> this project's column`` (``image``, ``label``), applied where the copy has
            the column.
        check_sizes: Whether the copy must have the entry's official split sizes and class count. False reads a copy
            whose layout has not been checked against its source as it is; every class must occur in every split
            either way.
    """

    repo: str
    revision: str | None
    data_files: dict[str, str] | None = None
    column_renames: dict[str, str] = field(default_factory=dict)
    check_sizes: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: its names, what it holds, and where it can be read from.

    Attributes:
        name: The name recipes and ``load_image_dataset`` use; lower case, it keys the data-set cache.
        title: Human-readable name for messages (default: ``name``).
        aliases: Other names accepted for it (matched lower-cased).
        num_classes: Number of classes; None when it depends on the folder (``imagefolder``).
        split_sizes: Rows of each official split: ``train`` and ``test``, and ``validation`` where the source has
            one (then used as it is instead of a split drawn from train). None when they depend on the folder.
        hub: The hub copy read when no ``data_dir`` is given; None for a local-only data set.
        local: How a local copy (``data_dir``) is read, or the builtin source; None for a hub-only data set.
    """

    name: str
    title: str = ""
    aliases: tuple[str, ...] = ()
    num_classes: int | None = None
    split_sizes: dict[str, int] | None = None
    hub: HubCopy | None = None
    local: LocalSource | None = None

    def __post_init__(self) -> None:
        for alias in (self.name, *self.aliases):
            if not alias or alias != alias.strip().lower():
                raise DatasetError(f"data set name or alias {alias!r} must be non-empty, lower case and unpadded "
                                   "(names are matched lower-cased)")
        object.__setattr__(self, "title", self.title or self.name)
        where = f"data set {self.name!r}"
        if self.hub is None and self.local is None:
            raise DatasetError(f"{where} has neither a hub copy nor a local source; give it hub=HubCopy(...) or "
                               "local=LocalLayout(...)")
        if self.hub is not None and isinstance(self.local, BuiltinSource):
            raise DatasetError(f"{where}: a builtin source is built from a package and takes no hub copy; drop hub")
        if self.num_classes is not None and self.num_classes < 2:
            raise DatasetError(f"{where}: num_classes must be ≥ 2, got {self.num_classes}")
        _check_splits(where, "split_sizes", self.split_sizes)
        if self.split_sizes is not None and any(size < 1 for size in self.split_sizes.values()):
            raise DatasetError(f"{where}: every split in split_sizes needs ≥ 1 row, got {self.split_sizes}")
        if self.hub is not None and self.hub.data_files is not None:
            _check_splits(where, "hub.data_files", self.hub.data_files)
            if self.split_sizes is not None and set(self.hub.data_files) != set(self.split_sizes):
                raise DatasetError(f"{where}: hub.data_files names the splits {sorted(self.hub.data_files)}, but "
                                   f"split_sizes lists {sorted(self.split_sizes)}; name the files of every official "
                                   "split")

    @property
    def splits(self) -> tuple[str, ...]:
        """The official splits, in the order train, validation, test: from ``split_sizes``, else the hub files."""
        declared = self.split_sizes or (self.hub.data_files if self.hub is not None else None) or ("train", "test")
        return tuple(split for split in SPLIT_ORDER if split in declared)

    @property
    def local_hint(self) -> str | None:
        """``data_dir=<what it must hold>``, or None when the entry cannot be read from a folder."""
        return f"data_dir=<{self.local.hint}>" if isinstance(self.local, FolderSource) else None

    def train_size(self, val_fraction: float) -> int | None:
        """Training images a run sees (all classes, nothing skipped), or None when the sizes are not declared.

        With an official validation split, the official train split; otherwise what remains after the stratified
        validation draw, which takes ``ceil(val_fraction * n_train)`` images (:mod:`.splits`).
        """
        if self.split_sizes is None:
            return None
        n_train = self.split_sizes["train"]
        if "validation" in self.split_sizes:
            return n_train
        return n_train - math.ceil(val_fraction * n_train)


def _check_splits(where: str, what: str, splits: dict[str, object] | None) -> None:
    if splits is None:
        return
    unknown = sorted(set(splits) - set(SPLIT_ORDER))
    if unknown or "train" not in splits or "test" not in splits:
        raise DatasetError(f"{where}: {what} must name the splits train and test, and validation where the source "
                           f"has one; got {sorted(splits)}")


# name -> entry, in registration order (the order messages list them in); alias -> name
_DATASETS: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under its name and aliases, so every part of the project can load it by name.

    Registering a name again replaces the earlier entry (and its aliases) with a warning. Returns ``spec``.

    Raises:
        DatasetError: an alias is the name of another registered data set.
    """
    for alias in spec.aliases:
        if alias in _DATASETS and alias != spec.name:
            raise DatasetError(f"alias {alias!r} of data set {spec.name!r} is the name of the registered data set "
                               f"{alias!r}; choose another alias")
    if spec.name in _DATASETS:
        warnings.warn(f"data set {spec.name!r} overwrites its earlier registration", stacklevel=2)
    if spec.name in _ALIASES:
        warnings.warn(f"data set {spec.name!r} overwrites the alias {spec.name!r} of {_ALIASES[spec.name]!r}",
                      stacklevel=2)
        del _ALIASES[spec.name]
    for alias in [alias for alias, name in _ALIASES.items() if name == spec.name]:
        del _ALIASES[alias]
    for alias in spec.aliases:
        if _ALIASES.get(alias, spec.name) != spec.name:
            warnings.warn(f"alias {alias!r} of data set {spec.name!r} overwrites its use for {_ALIASES[alias]!r}",
                          stacklevel=2)
        _ALIASES[alias] = spec.name
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    """Names of the registered data sets, in registration order (aliases left out)."""
    return list(_DATASETS)


def find_dataset(name: str) -> DatasetSpec | None:
    """The entry registered under ``name`` or one of its aliases (matched lower-cased), or None."""
    key = str(name).strip().lower()
    return _DATASETS.get(_ALIASES.get(key, key))


def get_dataset(name: str) -> DatasetSpec:
    """The entry registered under ``name`` or one of its aliases (matched lower-cased).

    Raises:
        DatasetError: no such data set; the message suggests close names and lists the known ones.
    """
    spec = find_dataset(name)
    if spec is None:
        raise unknown_dataset_error(name)
    return spec


def unknown_dataset_error(name: str, or_folder: bool = False) -> DatasetError:
    """The one-line error for an unregistered name (``or_folder``: a folder would have done as well)."""
    key = str(name).strip().lower()
    hint = did_you_mean(key, [*_DATASETS, *_ALIASES])
    hint = f". {hint}" if hint else ""
    if or_folder:
        return DatasetError(
            f"unknown data set {str(name)!r} (and no such folder){hint}; known: {', '.join(_DATASETS)}, "
            "or the path of a local folder (official CUB/Cars/CIFAR archive or an imagefolder tree)"
        )
    return DatasetError(f"unknown data set {str(name)!r}{hint}; known: {', '.join(_DATASETS)}; register it with "
                        "timm_bninit.data.register_dataset")


def recognise_folder(folder: Path) -> DatasetSpec | None:
    """The first entry (in registration order) whose local layout ``folder`` holds, or None."""
    for spec in _DATASETS.values():
        if isinstance(spec.local, FolderSource) and spec.local.recognises(folder):
            return spec
    return None


# ------------------------------------------------------------------------------------------------ the entries

# Layouts checked on the hub's file listings at the pinned commits (both written by datasets' Parquet conversion):
# CUB 1ef09e0: data/{train,test}-0000{0,1}-of-00002.parquet; columns image, label (ClassLabel, 200), bbox.
# Cars 9abf6cf ("Convert dataset to Parquet (#1)"): data/{train,test}-0000{0,1}-of-00002.parquet beside
# data/{contrast,gaussian_noise,impulse_noise,jpeg_compression,motion_blur,pixelate,spatter}-*.parquet, the corrupted
# test copies, which the globs below leave out; columns image, label (ClassLabel, 196), no bbox.
_TRAIN_TEST_PARQUET = {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}

# Index readers are called through their module so that a test can replace one (archives.read_cub_index, ...).
register_dataset(DatasetSpec(
    name="cub",
    title="CUB-200-2011",
    aliases=("cub200", "cub-200-2011", "cub_200_2011"),
    num_classes=200,
    split_sizes={"train": 5994, "test": 5794},
    hub=HubCopy("bentrevett/caltech-ucsd-birds-200-2011", "1ef09e021b0b65b40337f6f285909656f407f6e0",
                dict(_TRAIN_TEST_PARQUET)),
    local=LocalLayout(
        locate_root=lambda data_dir: archives.find_cub_root(data_dir),
        index_files=lambda root: archives.cub_index_files(root),
        image_dirs=lambda root: [root / "images"],
        read_index=lambda root, scratch: archives.read_cub_index(root),
        hint="the folder containing CUB_200_2011/ (the extracted CUB_200_2011.tgz)",
        recognise=lambda path: (path / archives.CUB_DIR).is_dir() or (path / "images.txt").is_file(),
    ),
))
register_dataset(DatasetSpec(
    name="cars",
    title="Stanford Cars",
    aliases=("stanford_cars", "stanford-cars", "stanfordcars"),
    num_classes=196,
    split_sizes={"train": 8144, "test": 8041},
    hub=HubCopy("tanganke/stanford_cars", "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40", dict(_TRAIN_TEST_PARQUET)),
    local=LocalLayout(
        locate_root=lambda data_dir: archives.find_cars_root(data_dir),
        index_files=lambda root: archives.cars_index_files(root),
        image_dirs=lambda root: [root / "cars_train", root / "cars_test"],
        read_index=lambda root, scratch: archives.read_cars_index(root),
        hint="the folder holding cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat",
        recognise=lambda path: (path / archives.CARS_META).is_file() or (path / "stanford_cars" / "devkit").is_dir(),
    ),
))
register_dataset(DatasetSpec(
    name="digits",
    title="scikit-learn digits",
    num_classes=10,
    split_sizes={"train": 1437, "test": 360},  # the documented stratified 80/20 split (see .digits)
    local=BuiltinSource(
        source=digits.DIGITS_SOURCE,
        build=lambda: digits.build_digits_dataset(),
        parameters=lambda: digits.digits_parameters(),
        note="bundled with scikit-learn",
    ),
))
# Any train/<class>/<image> tree; a bare folder that no entry recognises is read with this layout (resolve_source).
IMAGEFOLDER_LAYOUT = LocalLayout(
    locate_root=lambda data_dir: imagefolder.find_imagefolder_root(data_dir),
    index_files=lambda root: [],
    image_dirs=lambda root: [root],
    read_index=lambda root, scratch: imagefolder.read_imagefolder_index(root, scratch / "hf"),
    hint="folder with train/<class>/... and test/<class>/...",
)
register_dataset(DatasetSpec(name="imagefolder", title="image folder", local=IMAGEFOLDER_LAYOUT))
# CIFAR hub copies: two splits only, so the repository's own config is read. Neither pinned nor size-checked yet:
# their file layouts and commits have not been checked here.
register_dataset(DatasetSpec(
    name="cifar10",
    title="CIFAR-10",
    aliases=("cifar-10", "cifar_10"),
    num_classes=10,
    split_sizes={"train": 50_000, "test": 10_000},
    # columns img, label (ClassLabel, 10 names)
    hub=HubCopy("uoft-cs/cifar10", None, column_renames={"img": "image"}, check_sizes=False),
    local=CifarArchive(CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        meta_file="batches.meta",
        names_key="label_names",
        label_key="labels",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        recognised_by=("batches.meta",),
    )),
))
register_dataset(DatasetSpec(
    name="cifar100",
    title="CIFAR-100",
    aliases=("cifar-100", "cifar_100"),
    num_classes=100,
    split_sizes={"train": 50_000, "test": 10_000},
    # columns img, fine_label (ClassLabel, 100 names), coarse_label (ClassLabel, 20 superclasses)
    hub=HubCopy("uoft-cs/cifar100", None, column_renames={"img": "image", "fine_label": "label"}, check_sizes=False),
    local=CifarArchive(CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        meta_file="meta",
        names_key="fine_label_names",
        label_key="fine_labels",
        splits={"train": ("train",), "test": ("test",)},
        recognised_by=("meta", "train"),
        coarse_names_key="coarse_label_names",
        coarse_label_key="coarse_labels",
    )),
))
