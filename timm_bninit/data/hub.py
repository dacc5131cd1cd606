"""The Hugging Face hub copies of CUB-200-2011, Stanford Cars, CIFAR-10 and CIFAR-100, via ``datasets.load_dataset``.

The hub copies are Parquet files with the images embedded; ``datasets`` caches them itself (under ``cache_dir/hub``
when a cache dir is given, else in its default cache), so no second cache is built here. They are not decoded image by
image as the local archives are: they were built from the official archives and are read-only.

What is loaded is fixed, and checked once loaded:

- CUB and Cars are pinned to a commit of their hub repository (``hub_revision`` overrides it), so a later push to the
  repository cannot change a run's data unnoticed.
- Only the ``train`` and ``test`` Parquet files are named (``data_files``). Hub Cars also holds seven corrupted copies
  of its test split; ``load_dataset(repo)`` would download and prepare all nine splits, and passing ``split=`` does
  not avoid that.
- The split sizes must be the official ones and every class must occur in train and in test: a broken label column
  (a copy with one constant test label has circulated for Cars) or a half-uploaded split fails here, not as a
  mysteriously bad accuracy.

Hub Cars has no bounding boxes (the local archive has); CUB's hub copy has them as ``[x_min, y_min, x_max, y_max]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DatasetError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = ["HUB_COPIES", "HUB_REPOS", "HUB_COLUMN_RENAMES", "LOCAL_HINTS", "HubCopy", "load_hub_dataset"]


@dataclass(frozen=True)
class HubCopy:
    """One hub repository, what to read from it and what it must contain.

    Attributes:
        repo: Hub dataset id (``owner/name``), or a local folder laid out like that repository (tests use one; it is
            read by the same ``datasets.load_dataset`` call, which ignores the revision for a folder).
        revision: Commit the copy is pinned to; None for the repository's default branch.
        data_files: ``split -> glob`` of the Parquet files to read, relative to the repository root; None lets
            ``datasets`` read every split the repository declares.
        split_sizes: Rows each split must have after loading; None leaves the sizes unchecked.
        num_classes: Number of classes the label column must declare; None takes the declared ones. Every class must
            occur in every split either way.
        column_renames: ``hub column -> this project's column``, applied where the copy has the column.
    """

    repo: str
    revision: str | None
    data_files: dict[str, str] | None
    split_sizes: dict[str, int] | None
    num_classes: int | None
    column_renames: dict[str, str] = field(default_factory=dict)


# Layouts checked on the hub's file listings at these commits (both written by datasets' Parquet conversion):
# CUB 1ef09e0: data/{train,test}-0000{0,1}-of-00002.parquet; columns image, label (ClassLabel, 200), bbox.
# Cars 9abf6cf ("Convert dataset to Parquet (#1)"): data/{train,test}-0000{0,1}-of-00002.parquet beside
# data/{contrast,gaussian_noise,impulse_noise,jpeg_compression,motion_blur,pixelate,spatter}-*.parquet, the corrupted
# test copies, which the globs below leave out; columns image, label (ClassLabel, 196), no bbox.
_TRAIN_TEST_PARQUET = {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}
HUB_COPIES = {
    "cub": HubCopy(
        "bentrevett/caltech-ucsd-birds-200-2011",
        "1ef09e021b0b65b40337f6f285909656f407f6e0",
        _TRAIN_TEST_PARQUET,
        {"train": 5994, "test": 5794},
        200,
    ),
    "cars": HubCopy(
        "tanganke/stanford_cars",
        "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40",
        _TRAIN_TEST_PARQUET,
        {"train": 8144, "test": 8041},
        196,
    ),
    # CIFAR: two splits only, so the repository's own config is read. Neither pinned nor size-checked yet: their
    # file layouts and commits have not been checked here. Official sizes: 50,000 train / 10,000 test.
    # columns img, label (ClassLabel, 10 names)
    "cifar10": HubCopy("uoft-cs/cifar10", None, None, None, None, {"img": "image"}),
    # columns img, fine_label (ClassLabel, 100 names), coarse_label (ClassLabel, 20 superclasses)
    "cifar100": HubCopy("uoft-cs/cifar100", None, None, None, None, {"img": "image", "fine_label": "label"}),
}
HUB_REPOS = {kind: copy.repo for kind, copy in HUB_COPIES.items()}
# hub column -> this project's column; applied only where the hub copy has the column
HUB_COLUMN_RENAMES = {kind: copy.column_renames for kind, copy in HUB_COPIES.items() if copy.column_renames}
LOCAL_HINTS = {
    "cub": "the folder containing CUB_200_2011/ (the extracted CUB_200_2011.tgz)",
    "cars": "the folder holding cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat",
    "cifar10": "the folder containing cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
    "cifar100": "the folder containing cifar-100-python/ (the extracted cifar-100-python.tar.gz)",
}
KEPT_COLUMNS = ("image", "label", "coarse_label", "bbox")
SPLITS = ("train", "test")


def load_hub_dataset(
    kind: str, cache_dir: Path | None, revision: str | None = None, copy: HubCopy | None = None
) -> DatasetDict:
    """The hub copy's ``train`` and ``test`` splits: ``image``, ``label``, and ``bbox`` or ``coarse_label`` if present.

    Columns are renamed to this project's names first (CIFAR's ``img`` -> ``image``, CIFAR-100's ``fine_label`` ->
    ``label``; CIFAR-100 keeps ``coarse_label``), so every source reads the same.

    Args:
        kind: ``'cub'``, ``'cars'``, ``'cifar10'`` or ``'cifar100'``.
        cache_dir: Where ``datasets`` keeps the download; None for its default cache.
        revision: Hub commit, branch or tag to read instead of the pinned one (``HUB_COPIES[kind].revision``).
        copy: What to read and check instead of ``HUB_COPIES[kind]`` (a local stand-in of the repository in tests).

    Raises:
        DatasetError: the hub is unreachable (offline, no network) and the copy is not cached, the revision or the
            train/test files do not exist, or the copy does not have the expected splits, columns, sizes and classes.
            The message says what was found and how to use a local archive instead.
    """
    import datasets

    copy = HUB_COPIES[kind] if copy is None else copy
    revision = copy.revision if revision is None else revision
    where = f"hub copy {copy.repo!r}" + (f" at revision {revision}" if revision else "")
    local_hint = f"data_dir=<{LOCAL_HINTS[kind]}>"
    try:
        loaded = datasets.load_dataset(
            copy.repo,
            data_files=copy.data_files,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as err:  # offline, DNS failure, HTTP errors, unknown revision, ...: all mean "use a local copy"
        files = ", ".join(f"{split} {glob}" for split, glob in (copy.data_files or {}).items())
        asked = f" ({files})" if files else ""
        cause = " ".join(str(err).split())  # one line, whatever the hub library's message looks like
        raise DatasetError(
            f"could not load {kind!r}{asked} from its Hugging Face {where} ({type(err).__name__}: {cause}); "
            f"check hub access and hub_revision, or pass a local data dir instead: {local_hint}"
        ) from err

    missing = [split for split in SPLITS if split not in loaded]
    if missing:
        raise DatasetError(f"{where} has no {' or '.join(missing)} split (found {sorted(loaded)})")
    result = datasets.DatasetDict({name: _project_columns(loaded[name], name, copy, where) for name in SPLITS})
    result = _with_class_labels(result)
    _check_contents(result, copy, where, local_hint)
    return result


def _project_columns(split: Dataset, name: str, copy: HubCopy, where: str) -> Dataset:
    """The split with this project's column names, trimmed to the kept columns; ``bbox`` as four float32."""
    from datasets import Sequence, Value

    renames = {old: new for old, new in copy.column_renames.items() if old in split.column_names}
    split = split.rename_columns(renames) if renames else split
    if "image" not in split.column_names or "label" not in split.column_names:
        raise DatasetError(f"{where} split {name!r} lacks an image or label column: {split.column_names}")
    split = split.select_columns([c for c in KEPT_COLUMNS if c in split.column_names])
    box = Sequence(Value("float32"), length=4)  # the type the local archives give, so both sources read the same
    if "bbox" in split.column_names and split.features["bbox"] != box:
        try:
            split = split.cast_column("bbox", box)
        except Exception as err:  # a box that is not four numbers cannot be cast to a fixed-length list
            raise DatasetError(
                f"{where} split {name!r}: bbox is not four numbers [x_min, y_min, x_max, y_max] "
                f"({split.features['bbox']}: {type(err).__name__}: {err})"
            ) from err
    return split


def _with_class_labels(dataset: DatasetDict) -> DatasetDict:
    import datasets

    if isinstance(dataset["train"].features["label"], datasets.ClassLabel):
        return dataset
    # stratifying needs a ClassLabel. Not class_encode_column: it sorts the values as strings ('10' < '2'), which
    # would renumber integer labels; keep the integers and name the classes after them
    num_classes = 1 + max(max(split.unique("label")) for split in dataset.values())
    return dataset.cast_column("label", datasets.ClassLabel(names=[str(c) for c in range(num_classes)]))


def _check_contents(dataset: DatasetDict, copy: HubCopy, where: str, local_hint: str) -> None:
    """Official split sizes, the expected number of classes, and every class present in every split."""
    sizes = {name: len(dataset[name]) for name in SPLITS}
    if copy.split_sizes is not None and sizes != {name: copy.split_sizes[name] for name in SPLITS}:
        found = " / ".join(f"{sizes[name]:,} {name}" for name in SPLITS)
        expected = " / ".join(f"{copy.split_sizes[name]:,} {name}" for name in SPLITS)
        raise DatasetError(
            f"{where} has {found} rows, expected the official {expected}; pass another hub_revision, or {local_hint}"
        )
    num_classes = len(dataset["train"].features["label"].names)
    if copy.num_classes is not None and num_classes != copy.num_classes:
        raise DatasetError(
            f"{where} declares {num_classes} classes, expected {copy.num_classes}; pass another hub_revision, "
            f"or {local_hint}"
        )
    for name in SPLITS:
        present = set(dataset[name].unique("label"))
        stray = sorted(label for label in present if not 0 <= label < num_classes)
        if stray:
            raise DatasetError(
                f"{where} split {name!r} has labels outside 0..{num_classes - 1}: {stray[:5]}; "
                f"pass another hub_revision, or {local_hint}"
            )
        absent = sorted(set(range(num_classes)) - present)
        if absent:
            shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
            raise DatasetError(
                f"{where} split {name!r} has no image of {len(absent)} of its {num_classes} classes "
                f"(labels {shown}; found {len(present)} distinct labels), expected every class in train and test: "
                f"its label column is broken; pass another hub_revision, or {local_hint}"
            )
