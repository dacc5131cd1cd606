"""Hub copies of the registered data sets (CUB-200-2011, Stanford Cars, CIFAR-10/100, ...) via ``load_dataset``.

The hub copies are Parquet files with the images embedded; ``datasets`` caches them itself (under ``cache_dir/hub``
when a cache dir is given, else in its default cache), so no second cache is built here. They are not decoded image by
image as the local archives are: they were built from the official archives and are read-only.

What is loaded is fixed by the data set's registry entry (:mod:`.registry`), and checked once loaded:

- CUB and Cars are pinned to a commit of their hub repository (``hub_revision`` overrides it), so a later push to the
  repository cannot change a run's data unnoticed.
- Only the Parquet files of the official splits are named (``data_files``): ``train`` and ``test``, and
  ``validation`` where the source has one. Hub Cars also holds seven corrupted copies of its test split;
  ``load_dataset(repo)`` would download and prepare all nine splits, and passing ``split=`` does not avoid that.
- The split sizes must be the official ones and every class must occur in every split: a broken label column
  (a copy with one constant test label has circulated for Cars) or a half-uploaded split fails here, not as a
  mysteriously bad accuracy.

Hub Cars has no bounding boxes (the local archive has); CUB's hub copy has them as ``[x_min, y_min, x_max, y_max]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DatasetError
from .registry import DatasetSpec, HubCopy

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = ["HubCopy", "load_hub_dataset"]

KEPT_COLUMNS = ("image", "label", "coarse_label", "bbox")


def load_hub_dataset(spec: DatasetSpec, cache_dir: Path | None, revision: str | None = None) -> DatasetDict:
    """The hub copy's official splits: ``image``, ``label``, and ``bbox`` or ``coarse_label`` if present.

    Columns are renamed to this project's names first (CIFAR's ``img`` -> ``image``, CIFAR-100's ``fine_label`` ->
    ``label``; CIFAR-100 keeps ``coarse_label``), so every source reads the same.

    Args:
        spec: The data set's registry entry; its ``hub`` says what to read, its splits, sizes and classes what the
            copy must contain.
        cache_dir: Where ``datasets`` keeps the download; None for its default cache.
        revision: Hub commit, branch or tag to read instead of the pinned one (``spec.hub.revision``).

    Raises:
        DatasetError: the entry has no hub copy, the hub is unreachable (offline, no network) and the copy is not
            cached, the revision or the split files do not exist, or the copy does not have the expected splits,
            columns, sizes and classes. The message says what was found and how to use a local archive instead.
    """
    import datasets

    copy = spec.hub
    if copy is None:
        raise DatasetError(f"data set {spec.name!r} has no hub copy to load; read it from a local folder (data_dir)")
    revision = copy.revision if revision is None else revision
    where = f"hub copy {copy.repo!r}" + (f" at revision {revision}" if revision else "")
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
        local = f", or pass a local data dir instead: {spec.local_hint}" if spec.local_hint else ""
        raise DatasetError(
            f"could not load {spec.name!r}{asked} from its Hugging Face {where} ({type(err).__name__}: {cause}); "
            f"check hub access and hub_revision{local}"
        ) from err

    missing = [split for split in spec.splits if split not in loaded]
    if missing:
        raise DatasetError(f"{where} has no {' or '.join(missing)} split (found {sorted(loaded)})")
    result = datasets.DatasetDict({name: _project_columns(loaded[name], name, copy, where) for name in spec.splits})
    result = _with_class_labels(result)
    _check_contents(result, spec, where)
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


def _check_contents(dataset: DatasetDict, spec: DatasetSpec, where: str) -> None:
    """Official split sizes, the expected number of classes, and every class present in every split."""
    way_out = "pass another hub_revision" + (f", or {spec.local_hint}" if spec.local_hint else "")
    checked = spec.hub is not None and spec.hub.check_sizes
    sizes = {name: len(dataset[name]) for name in spec.splits}
    if checked and spec.split_sizes is not None and sizes != dict(spec.split_sizes):
        found = " / ".join(f"{sizes[name]:,} {name}" for name in spec.splits)
        expected = " / ".join(f"{spec.split_sizes[name]:,} {name}" for name in spec.splits)
        raise DatasetError(f"{where} has {found} rows, expected the official {expected}; {way_out}")
    num_classes = len(dataset["train"].features["label"].names)
    if checked and spec.num_classes is not None and num_classes != spec.num_classes:
        raise DatasetError(f"{where} declares {num_classes} classes, expected {spec.num_classes}; {way_out}")
    every_split = " and ".join([", ".join(spec.splits[:-1]), spec.splits[-1]])
    for name in spec.splits:
        present = set(dataset[name].unique("label"))
        stray = sorted(label for label in present if not 0 <= label < num_classes)
        if stray:
            raise DatasetError(
                f"{where} split {name!r} has labels outside 0..{num_classes - 1}: {stray[:5]}; {way_out}"
            )
        absent = sorted(set(range(num_classes)) - present)
        if absent:
            shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
            raise DatasetError(
                f"{where} split {name!r} has no image of {len(absent)} of its {num_classes} classes "
                f"(labels {shown}; found {len(present)} distinct labels), expected every class in {every_split}: "
                f"its label column is broken; {way_out}"
            )
