"""The data layer's entry point: a name or folder in; ``train`` / ``validation`` / ``test`` and their info out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .archives import BBOX_FORMAT
from .cache import default_cache_dir
from .errors import DatasetError, SkippedFile
from .hub import load_hub_dataset
from .local import BuiltinSource, FolderSource, LocalLoad
from .registry import DatasetSpec, find_dataset, get_dataset, recognise_folder, unknown_dataset_error
from .splits import add_validation_split

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["ImageDatasetInfo", "resolve_source", "load_image_dataset"]

# a bare folder that no registered layout recognises is read as an imagefolder tree
FALLBACK_LAYOUT = "imagefolder"


@dataclass
class ImageDatasetInfo:
    """What was loaded and how; ``to_dict()`` is what a run directory records.

    Attributes:
        name: The data set's registry name (``'cub'``, ``'cars'``, ``'cifar10'``, ``'digits'``, ``'imagefolder'``...).
        origin: ``'hub'`` (Hugging Face hub copy), ``'local'`` (a folder) or ``'builtin'`` (digits).
        source: Hub repository id, resolved local folder, or ``'sklearn.datasets.load_digits'``.
        revision: Hub commit (or branch / tag) the hub copy was read at; None for local sources and unpinned copies.
        class_names: Class names in label order.
        split_sizes: Rows per split.
        val_fraction: Fraction of train drawn as validation (None when the source ships its own validation split).
        split_seed: Seed of the validation draw (None when the source ships its own validation split).
        has_bbox: Whether rows carry a ``bbox`` column.
        bbox_format: ``'xyxy'`` (``[x_min, y_min, x_max, y_max]`` in pixels) when ``has_bbox``.
        skipped: Images left out because ``skip_corrupt=True`` was passed, with the reason for each.
        cache_path: The cache entry the local splits are memory-mapped from (None for hub copies).
        from_cache: Whether that entry already existed (False: it was built by this call).
    """

    name: str
    origin: str
    source: str
    class_names: list[str]
    revision: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    val_fraction: float | None = None
    split_seed: int | None = None
    has_bbox: bool = False
    bbox_format: str | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    cache_path: str | None = None
    from_cache: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record, including ``num_classes`` and ``num_skipped``."""
        return {
            "name": self.name,
            "origin": self.origin,
            "source": self.source,
            "revision": self.revision,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "split_sizes": dict(self.split_sizes),
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "has_bbox": self.has_bbox,
            "bbox_format": self.bbox_format,
            "num_skipped": self.num_skipped,
            "skipped": [file.to_dict() for file in self.skipped],
            "cache_path": self.cache_path,
            "from_cache": self.from_cache,
        }


def resolve_source(name_or_path: str | Path, data_dir: str | Path | None = None) -> tuple[str, Path | None]:
    """``(registry name, local folder or None)`` for a data-set name or a folder.

    A registered name (``cub``, ``cars``, ``cifar10``, ``cifar100``, ``digits``, ``imagefolder``, one registered with
    :func:`~timm_bninit.data.register_dataset`, or an alias such as ``cub200``) selects the entry; its folder is
    ``data_dir`` (None: its hub copy, or its builtin source). Anything else must be an existing folder, whose layout
    picks the entry (each entry's ``recognise``, in registration order): ``CUB_200_2011/`` or ``images.txt`` ->
    ``cub``; ``devkit/cars_meta.mat`` -> ``cars``; ``cifar-10-batches-py/`` or ``batches.meta`` -> ``cifar10``;
    ``cifar-100-python/`` or ``meta`` with ``train`` -> ``cifar100``; otherwise ``imagefolder``.

    Raises:
        DatasetError: an unknown name that is no folder, or a combination the entry cannot serve: a ``data_dir``
            for a hub-only entry or a builtin set, none for an entry without a hub copy, or both a folder and a
            ``data_dir``.
    """
    spec = find_dataset(str(name_or_path))
    if spec is not None:
        _check_combination(spec, data_dir)
        return spec.name, None if data_dir is None else Path(data_dir).expanduser()

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise unknown_dataset_error(str(name_or_path), or_folder=True)
    if data_dir is not None and Path(data_dir).expanduser().resolve() != path.resolve():
        raise DatasetError(
            f"got both the folder {str(name_or_path)!r} and data_dir={str(data_dir)!r}; pass a data-set name with "
            "data_dir, or just the folder"
        )
    recognised = recognise_folder(path)
    return (FALLBACK_LAYOUT if recognised is None else recognised.name), path


def _check_combination(spec: DatasetSpec, data_dir: str | Path | None) -> None:
    """Refuse, in one line, a ``data_dir`` the entry cannot use or a missing one it needs."""
    if data_dir is not None:
        if isinstance(spec.local, BuiltinSource):
            raise DatasetError(f"{spec.name!r} is {spec.local.note} and takes no data_dir (got {str(data_dir)!r})")
        if spec.local is None:
            raise DatasetError(
                f"{spec.name!r} is read from its hub copy {spec.hub.repo!r} only and has no local layout, so it takes "
                f"no data_dir (got {str(data_dir)!r}); drop data_dir, or register the entry with a local layout"
            )
    elif spec.hub is None and isinstance(spec.local, FolderSource):
        raise DatasetError(f"{spec.name!r} needs data_dir=<{spec.local.hint}>")


def _find_root(spec: DatasetSpec, source: FolderSource, folder: Path) -> Path:
    """The source's root in ``folder``; a folder holding another registered data set says which."""
    try:
        return source.find_root(folder)
    except DatasetError as error:
        other = recognise_folder(folder) if folder.is_dir() else None
        if other is None or other.name == spec.name:
            raise
        raise DatasetError(f"{error}; it holds {other.title} instead: did you mean {other.name!r}?") from error


def _load_official(spec: DatasetSpec, folder: Path | None, cache_root: Path, own_cache: bool, skip_corrupt: bool,
                   hub_revision: str | None) -> tuple[DatasetDict, ImageDatasetInfo]:
    """The source's official splits (a hub copy, a builtin set or a local folder) and their info."""
    kind = spec.name
    from_hub = folder is None and spec.hub is not None
    if hub_revision is not None and not from_hub:
        where = f"the local folder {str(folder)!r}" if folder is not None else f"{kind!r}, which has no hub copy"
        raise DatasetError(
            f"hub_revision={hub_revision!r} selects a hub copy's commit, but the data come from {where}; "
            "drop hub_revision, or drop data_dir to read the hub copy"
        )
    if from_hub:
        official = load_hub_dataset(spec, cache_root / "hub" if own_cache else None, revision=hub_revision)
        names = list(official["train"].features["label"].names)
        info = ImageDatasetInfo(kind, "hub", spec.hub.repo, names, revision=hub_revision or spec.hub.revision)
        return official, info

    loaded = _load_local(spec, folder, cache_root, skip_corrupt)
    info = ImageDatasetInfo(
        kind,
        spec.local.origin,
        loaded.source,
        loaded.class_names,
        skipped=loaded.skipped,
        cache_path=str(loaded.cache_path),
        from_cache=loaded.from_cache,
    )
    return loaded.dataset, info


def _load_local(spec: DatasetSpec, folder: Path | None, cache_root: Path, skip_corrupt: bool) -> LocalLoad:
    if isinstance(spec.local, BuiltinSource):
        return spec.local.load(spec.name, cache_root)
    if not isinstance(spec.local, FolderSource) or folder is None:  # resolve_source refuses these first
        raise DatasetError(f"{spec.name!r} cannot be read from {'no folder' if folder is None else str(folder)!r}")
    root = _find_root(spec, spec.local, folder)
    return spec.local.load(spec.name, root, cache_root, skip_corrupt)


def load_image_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    skip_corrupt: bool = False,
    hub_revision: str | None = None,
) -> tuple[DatasetDict, ImageDatasetInfo]:
    """Load an image-classification data set as ``train`` / ``validation`` / ``test`` splits.

    The official splits are kept: train and test, and validation where the source has one (its registry entry lists
    it, or an imagefolder tree has a ``validation/`` folder); otherwise validation is a stratified ``val_fraction`` of
    train drawn with ``split_seed`` (see :mod:`timm_bninit.data.splits`). Local sources are parsed, every image is
    decoded once, and the result is cached under ``cache_dir``, so later loads memory-map it and take seconds.

    Example::

        data, info = load_image_dataset("cub", data_dir="/data")        # /data/CUB_200_2011/...
        data, info = load_image_dataset("cifar10", data_dir="/data")    # /data/cifar-10-batches-py/...
        data, info = load_image_dataset("digits")                       # offline demo set
        print(info.num_classes, info.split_sizes, info.skipped)

    Args:
        name_or_path: ``'cub'``, ``'cars'``, ``'cifar10'``, ``'cifar100'``, ``'digits'``, ``'imagefolder'``, another
            registered name (:mod:`timm_bninit.data.registry`), or a local folder (layout detected).
        data_dir: Local folder for ``cub``/``cars``/``cifar10``/``cifar100`` (official archive layout; the hub copy
            is used when absent) or ``imagefolder``: what the entry's local layout reads.
        cache_dir: Cache for built local data sets and hub downloads; default ``$TIMM_BNINIT_DATA_CACHE`` or
            ``~/.cache/timm_bninit/datasets``.
        val_fraction: Fraction of the training images drawn, per class, as the validation split (0: none); not used
            when the source has its own validation split.
        split_seed: Seed of that draw, independent of any run seed and of global random state.
        skip_corrupt: Leave out missing or undecodable images instead of failing; they are listed in
            ``info.skipped``. Not used by CIFAR, whose images are arrays inside the batch files.
        hub_revision: Commit, branch or tag of the hub copy to read instead of the pinned commit
            (the entry's ``hub.revision``). Only for a hub copy: refused with a ``data_dir`` or a local source.

    Returns:
        ``(DatasetDict, ImageDatasetInfo)``. Columns: ``image`` (``datasets.Image``), ``label``
        (``datasets.ClassLabel``), ``bbox`` (``info.has_bbox``) for CUB and for the local Cars archive (hub Cars has
        no boxes), ``coarse_label`` (the 20 superclasses) for CIFAR-100,
        and ``file`` (path within the source; ``<batch file>/<row>`` for CIFAR) for local sources.

    Raises:
        DatasetError: the name is unknown or the entry cannot be read as asked (see :func:`resolve_source`), the
            source is missing, malformed, has bad labels, empty classes or unreadable images, or the hub is
            unreachable, or the hub copy's split sizes or classes are not the official ones; the message names the
            file and what to do.
    """
    kind, folder = resolve_source(name_or_path, data_dir)
    cache_root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    spec = get_dataset(kind)
    official, info = _load_official(spec, folder, cache_root, cache_dir is not None, skip_corrupt, hub_revision)

    dataset = add_validation_split(official, val_fraction=val_fraction, split_seed=split_seed)
    if "validation" not in official:
        info.val_fraction, info.split_seed = val_fraction, split_seed
    info.split_sizes = {name: len(split) for name, split in dataset.items()}
    info.has_bbox = "bbox" in dataset["train"].column_names
    info.bbox_format = BBOX_FORMAT if info.has_bbox else None
    return dataset, info
