"""Any ``imagefolder`` tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), listed by ``datasets``' own builder.

The builder decides which files are images, which folder names are splits (``train``/``training``,
``test``/``testing``/``eval``, ``validation``/``valid``/``val``/``dev``) and infers the class names from the folder
names. Its result is turned into an :class:`~timm_bninit.data.archives.ArchiveIndex` so that the images go through the
same decoding check and cache as the official archives.
"""

from __future__ import annotations

from pathlib import Path

from .archives import ArchiveIndex, SplitIndex, check_class_coverage
from .errors import DatasetError

__all__ = ["find_imagefolder_root", "read_imagefolder_index"]


def find_imagefolder_root(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"image folder {str(data_dir)!r} does not exist or is not a folder")
    return data_dir.resolve()


def read_imagefolder_index(root: Path, hf_cache_dir: Path) -> ArchiveIndex:
    """List an image folder with ``load_dataset('imagefolder')`` and check it has labelled train and test splits.

    Args:
        root: The tree's top folder, holding ``train/`` and ``test/`` (and optionally ``validation/``).
        hf_cache_dir: Scratch cache for the builder's own Arrow files; the caller deletes it.
    """
    import datasets

    try:
        built = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(hf_cache_dir))
    except Exception as err:  # the builder raises FileNotFoundError, ValueError, ... for an unusable tree
        raise DatasetError(
            f"image folder {str(root)!r} cannot be read by datasets' imagefolder builder "
            f"({type(err).__name__}: {err}); expected train/<class>/<image> and test/<class>/<image>"
        ) from err
    missing = [split for split in ("train", "test") if split not in built]
    if missing:
        raise DatasetError(
            f"image folder {str(root)!r} has no {' or '.join(missing)} split (found {sorted(built)}); expected "
            "train/<class>/<image> and test/<class>/<image> (a validation/ folder is optional)"
        )
    label_feature = built["train"].features.get("label")
    if not isinstance(label_feature, datasets.ClassLabel):
        raise DatasetError(
            f"image folder {str(root)!r} has no class subfolders, so its images have no labels; "
            "expected train/<class>/<image> and test/<class>/<image>"
        )
    class_names = list(label_feature.names)
    _check_no_empty_class_folders(root, set(class_names))

    splits = {}
    for name, split in built.items():
        rows = split.cast_column("image", datasets.Image(decode=False))
        paths = [image["path"] for image in rows["image"]]
        splits[name] = SplitIndex(
            files=[Path(path).resolve().relative_to(root).as_posix() for path in paths],
            labels=list(rows["label"]),
        )
    index = ArchiveIndex("imagefolder", root, class_names, splits)
    check_class_coverage(index, f"image folder {str(root)!r}")
    return index


def _check_no_empty_class_folders(root: Path, class_names: set[str]) -> None:
    # the builder infers classes from the images it finds, so a class folder without images would silently vanish
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in class_names:
                raise DatasetError(
                    f"class folder {str(class_dir)!r} holds no images (no file with an image extension); "
                    "add its images or remove the folder"
                )
