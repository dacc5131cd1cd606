"""The Hugging Face hub copies of CUB-200-2011, Stanford Cars, CIFAR-10 and CIFAR-100, via ``datasets.load_dataset``.

The hub copies are Parquet files with the images embedded; ``datasets`` caches them itself (under ``cache_dir/hub``
when a cache dir is given, else in its default cache), so no second cache is built here. They are not decoded image by
image as the local archives are: they were built from the official archives and are read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DatasetError

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["HUB_REPOS", "HUB_COLUMN_RENAMES", "LOCAL_HINTS", "load_hub_dataset"]

HUB_REPOS = {
    # columns image, label (ClassLabel, 200 names), bbox ([x_min, y_min, x_max, y_max]); splits train 5,994 / test 5,794
    "cub": "bentrevett/caltech-ucsd-birds-200-2011",
    # columns image, label (ClassLabel, 196 names); splits train 8,144 / test 8,041
    "cars": "tanganke/stanford_cars",
    # columns img, label (ClassLabel, 10 names); splits train 50,000 / test 10,000
    "cifar10": "uoft-cs/cifar10",
    # columns img, fine_label (ClassLabel, 100 names), coarse_label (ClassLabel, 20 superclasses); 50,000 / 10,000
    "cifar100": "uoft-cs/cifar100",
}
# hub column -> this project's column; applied only where the hub copy has the column
HUB_COLUMN_RENAMES = {
    "cifar10": {"img": "image"},
    "cifar100": {"img": "image", "fine_label": "label"},
}
LOCAL_HINTS = {
    "cub": "the folder containing CUB_200_2011/ (the extracted CUB_200_2011.tgz)",
    "cars": "the folder holding cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat",
    "cifar10": "the folder containing cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
    "cifar100": "the folder containing cifar-100-python/ (the extracted cifar-100-python.tar.gz)",
}
KEPT_COLUMNS = ("image", "label", "coarse_label", "bbox")


def load_hub_dataset(kind: str, cache_dir: Path | None) -> DatasetDict:
    """The hub copy's ``train`` and ``test`` splits: ``image``, ``label``, and ``bbox`` or ``coarse_label`` if present.

    Columns are renamed to this project's names first (CIFAR's ``img`` -> ``image``, CIFAR-100's ``fine_label`` ->
    ``label``; CIFAR-100 keeps ``coarse_label``), so every source reads the same.

    Args:
        kind: ``'cub'``, ``'cars'``, ``'cifar10'`` or ``'cifar100'``.
        cache_dir: Where ``datasets`` keeps the download; None for its default cache.

    Raises:
        DatasetError: the hub is unreachable (offline, no network) and the copy is not cached, or the copy does not
            have the expected splits and columns. The message says how to use a local archive instead.
    """
    import datasets

    repo = HUB_REPOS[kind]
    try:
        loaded = datasets.load_dataset(repo, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # offline mode, DNS failure, HTTP errors, ...: all mean "use a local copy"
        raise DatasetError(
            f"could not load {kind!r} from its Hugging Face hub copy {repo!r} ({type(err).__name__}: {err}); "
            f"without hub access pass a local data dir instead: data_dir=<{LOCAL_HINTS[kind]}>"
        ) from err

    missing = [split for split in ("train", "test") if split not in loaded]
    if missing:
        raise DatasetError(f"hub copy {repo!r} has no {' or '.join(missing)} split (found {sorted(loaded)})")
    splits = {}
    for name in ("train", "test"):
        split = loaded[name]
        renames = {old: new for old, new in HUB_COLUMN_RENAMES.get(kind, {}).items() if old in split.column_names}
        split = split.rename_columns(renames) if renames else split
        if "image" not in split.column_names or "label" not in split.column_names:
            raise DatasetError(f"hub copy {repo!r} split {name!r} lacks an image or label column: {split.column_names}")
        splits[name] = split.select_columns([c for c in KEPT_COLUMNS if c in split.column_names])
    result = datasets.DatasetDict(splits)
    if not isinstance(result["train"].features["label"], datasets.ClassLabel):
        # stratifying needs a ClassLabel. Not class_encode_column: it sorts the values as strings ('10' < '2'),
        # which would renumber integer labels; keep the integers and name the classes after them
        num_classes = 1 + max(max(split.unique("label")) for split in result.values())
        result = result.cast_column("label", datasets.ClassLabel(names=[str(c) for c in range(num_classes)]))
    return result
