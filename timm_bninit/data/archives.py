"""Readers for the official CUB-200-2011 and Stanford Cars archives, and the index they produce.

A reader only parses the archive's index files into an :class:`ArchiveIndex` (file, 0-based label, box per image,
per official split) and checks it for consistency; images are decoded later, once, when the cache is built
(:mod:`timm_bninit.data.verify`). Both readers are thin on purpose: the index files are a few lines of text or a
MATLAB struct array, and ``datasets`` has no builder for either layout.

Bounding boxes are stored as ``[x_min, y_min, x_max, y_max]`` in pixels, the convention of the CUB hub copy
(``bentrevett/caltech-ucsd-birds-200-2011``) and of the Cars annotation files; CUB's ``bounding_boxes.txt`` lists
``<x> <y> <width> <height>`` and is converted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError

__all__ = [
    "ArchiveIndex",
    "SplitIndex",
    "CUB_DIR",
    "find_cub_root",
    "cub_index_files",
    "read_cub_index",
    "find_cars_root",
    "cars_index_files",
    "read_cars_index",
    "check_class_coverage",
]

BBOX_FORMAT = "xyxy"

CUB_DIR = "CUB_200_2011"
CUB_INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt")

CARS_META = "devkit/cars_meta.mat"
CARS_TRAIN_ANNOS = "devkit/cars_train_annos.mat"
CARS_TEST_ANNOS = "cars_test_annos_withlabels.mat"
CARS_ANNO_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


@dataclass
class SplitIndex:
    """The images of one official split.

    Attributes:
        files: Image paths relative to the archive root, POSIX separators.
        labels: 0-based class indices, one per file.
        bboxes: ``[x_min, y_min, x_max, y_max]`` per file, or None if the source has no boxes.
    """

    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    bboxes: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def select(self, keep: Sequence[int]) -> SplitIndex:
        """A new index holding only the rows at positions ``keep``."""
        return SplitIndex(
            files=[self.files[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            bboxes=None if self.bboxes is None else [self.bboxes[i] for i in keep],
        )


@dataclass
class ArchiveIndex:
    """What a local data set lists: class names and, per official split, files, labels and boxes.

    Attributes:
        name: What the source is (``'cub'``, ``'cars'``, ``'imagefolder'``, ``'CIFAR-10'``).
        root: Folder the file paths are relative to.
        class_names: Class names in label order.
        splits: Official splits by name (``'train'``, ``'test'``, and ``'validation'`` if the source has one).
    """

    name: str
    root: Path
    class_names: list[str]
    splits: dict[str, SplitIndex]

    @property
    def has_bbox(self) -> bool:
        return all(split.bboxes is not None for split in self.splits.values())


def check_class_coverage(index: ArchiveIndex, described_as: str) -> None:
    """Fail if a class has no images at all or no training images.

    A class without training images cannot be learned or stratified, and one without any images means the index
    files and the class list disagree; either way the archive is not what it claims to be.

    Args:
        index: The index to check.
        described_as: How to name the source in the message, e.g. the path of its index file.
    """
    num_classes = len(index.class_names)
    counts = {name: Counter(split.labels) for name, split in index.splits.items()}
    empty = [c for c in range(num_classes) if not any(count[c] for count in counts.values())]
    if empty:
        raise DatasetError(
            f"{described_as}: {len(empty)} of {num_classes} classes have no images: "
            f"{_preview(index.class_names[c] for c in empty)}; every class listed must have images "
            "(remove the class from the class list or restore its images)"
        )
    no_train = [c for c in range(num_classes) if not counts.get("train", Counter())[c]]
    if no_train:
        raise DatasetError(
            f"{described_as}: {len(no_train)} of {num_classes} classes have no training images: "
            f"{_preview(index.class_names[c] for c in no_train)}; every class needs training images"
        )


# ---------------------------------------------------------------------------------------------------------- CUB


def find_cub_root(data_dir: str | Path) -> Path:
    """The ``CUB_200_2011/`` folder, given either it or the folder that contains it."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"CUB-200-2011 data dir {str(data_dir)!r} does not exist or is not a folder")
    for candidate in (data_dir / CUB_DIR, data_dir):
        if (candidate / "images.txt").is_file() or (candidate / "images").is_dir():
            return candidate.resolve()
    raise DatasetError(
        f"no CUB-200-2011 archive in {str(data_dir)!r}: expected {CUB_DIR}/images.txt or images.txt there; "
        f"pass the folder that contains {CUB_DIR}/ (the extracted CUB_200_2011.tgz) or {CUB_DIR}/ itself"
    )


def cub_index_files(root: Path) -> list[Path]:
    """The CUB index files, in a fixed order (they key the cache)."""
    return [root / name for name in CUB_INDEX_FILES]


def read_cub_index(root: Path) -> ArchiveIndex:
    """Parse and cross-check the index files of an extracted ``CUB_200_2011/`` folder."""
    for path in [*cub_index_files(root), root / "images"]:
        if not path.exists():
            kind = "folder" if path.name == "images" else "index file"
            raise DatasetError(
                f"CUB-200-2011 archive {str(root)!r} is missing the {kind} {path.name!r} "
                f"(expected {path}); re-extract CUB_200_2011.tgz"
            )

    class_rows = _read_rows(root / "classes.txt", 2, "<class_id> <class_name>")
    class_ids = [_parse_int(row, 0, path, line) for path, line, row in class_rows]
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DatasetError(
            f"{root / 'classes.txt'}: class ids must run 1, 2, ..., N in order; got {_preview(class_ids)}"
        )
    class_names = [row[1] for _, _, row in class_rows]
    num_classes = len(class_names)
    if num_classes == 0:
        raise DatasetError(f"{root / 'classes.txt'}: no classes listed")

    images = {
        _parse_int(row, 0, path, line): row[1]
        for path, line, row in _unique_ids(_read_rows(root / "images.txt", 2, "<image_id> <class_dir>/<file>.jpg"))
    }
    labels = {}
    for path, line, row in _unique_ids(_read_rows(root / "image_class_labels.txt", 2, "<image_id> <class_id>")):
        label = _parse_int(row, 1, path, line)
        if not 1 <= label <= num_classes:
            raise DatasetError(
                f"{path}:{line}: class id {label} of image {row[0]} is outside 1..{num_classes} "
                f"(classes.txt lists {num_classes} classes)"
            )
        labels[int(row[0])] = label - 1
    is_train = {}
    for path, line, row in _unique_ids(_read_rows(root / "train_test_split.txt", 2, "<image_id> <1 train|0 test>")):
        flag = _parse_int(row, 1, path, line)
        if flag not in (0, 1):
            raise DatasetError(f"{path}:{line}: is_training_image must be 1 (train) or 0 (test), got {row[1]!r}")
        is_train[int(row[0])] = flag == 1
    boxes = {}
    for path, line, row in _unique_ids(_read_rows(root / "bounding_boxes.txt", 5, "<image_id> <x> <y> <w> <h>")):
        x, y, w, h = (_parse_float(row, i, path, line) for i in range(1, 5))
        boxes[int(row[0])] = [x, y, x + w, y + h]

    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                        ("bounding_boxes.txt", boxes)):
        _check_same_ids(images, table, root / "images.txt", root / name)

    splits = {"train": SplitIndex(bboxes=[]), "test": SplitIndex(bboxes=[])}
    for image_id in sorted(images):
        split = splits["train" if is_train[image_id] else "test"]
        split.files.append(f"images/{images[image_id]}")
        split.labels.append(labels[image_id])
        split.bboxes.append(boxes[image_id])
    index = ArchiveIndex("cub", root, class_names, splits)
    check_class_coverage(index, str(root / "image_class_labels.txt"))
    return index


# ---------------------------------------------------------------------------------------------------------- Cars


def find_cars_root(data_dir: str | Path) -> Path:
    """The Stanford Cars folder holding ``devkit/``, given either it or a folder that contains ``stanford_cars/``."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"Stanford Cars data dir {str(data_dir)!r} does not exist or is not a folder")
    # torchvision's StanfordCars expects <root>/stanford_cars/, so accept that parent folder too
    for candidate in (data_dir, data_dir / "stanford_cars"):
        if (candidate / "devkit").is_dir():
            return candidate.resolve()
    raise DatasetError(
        f"no Stanford Cars archive in {str(data_dir)!r}: expected devkit/, cars_train/, cars_test/ and "
        f"{CARS_TEST_ANNOS} there; pass the folder that holds them (or its parent holding stanford_cars/)"
    )


def _cars_test_annos(root: Path) -> Path:
    # the labelled test annotations shipped separately from the devkit; copies put them beside or inside devkit/
    for path in (root / CARS_TEST_ANNOS, root / "devkit" / CARS_TEST_ANNOS):
        if path.is_file():
            return path
    raise DatasetError(
        f"Stanford Cars archive {str(root)!r} is missing the index file {CARS_TEST_ANNOS!r} (looked in "
        f"{root} and {root / 'devkit'}); devkit/cars_test_annos.mat has no labels, download "
        f"{CARS_TEST_ANNOS} and put it beside devkit/"
    )


def _cars_image_dir(root: Path, split: str) -> Path:
    folder = root / f"cars_{split}"
    if not folder.is_dir():
        raise DatasetError(
            f"Stanford Cars archive {str(root)!r} is missing the folder 'cars_{split}' (expected {folder}); "
            f"extract cars_{split}.tgz there"
        )
    # some mirrors (e.g. Kaggle's) nest the images one level deeper: cars_train/cars_train/00001.jpg
    nested = folder / folder.name
    return nested if nested.is_dir() else folder


def cars_index_files(root: Path) -> list[Path]:
    """The Stanford Cars index files, in a fixed order (they key the cache)."""
    for name in (CARS_META, CARS_TRAIN_ANNOS):
        if not (root / name).is_file():
            raise DatasetError(
                f"Stanford Cars archive {str(root)!r} is missing the index file {name!r} "
                f"(expected {root / name}); extract car_devkit.tgz there"
            )
    return [root / CARS_META, root / CARS_TRAIN_ANNOS, _cars_test_annos(root)]


def read_cars_index(root: Path) -> ArchiveIndex:
    """Parse and cross-check the devkit ``.mat`` files of an extracted Stanford Cars archive."""
    meta_path, train_path, test_path = cars_index_files(root)
    class_names = [str(name).strip() for name in np.atleast_1d(_load_mat_variable(meta_path, "class_names")).tolist()]
    if not class_names:
        raise DatasetError(f"{meta_path}: 'class_names' is empty")
    splits = {
        "train": _read_cars_annotations(train_path, _cars_image_dir(root, "train"), root, len(class_names)),
        "test": _read_cars_annotations(test_path, _cars_image_dir(root, "test"), root, len(class_names)),
    }
    index = ArchiveIndex("cars", root, class_names, splits)
    check_class_coverage(index, f"{train_path} and {test_path}")
    return index


def _read_cars_annotations(path: Path, image_dir: Path, root: Path, num_classes: int) -> SplitIndex:
    annotations = np.atleast_1d(_load_mat_variable(path, "annotations"))
    fields = annotations.dtype.names or ()
    missing = [name for name in CARS_ANNO_FIELDS if name not in fields]
    if missing:
        hint = "; this looks like the unlabelled cars_test_annos.mat" if missing == ["class"] else ""
        raise DatasetError(
            f"{path}: 'annotations' lacks the field(s) {missing} (has {list(fields)}); expected a struct array with "
            f"fields {list(CARS_ANNO_FIELDS)}{hint}"
        )
    prefix = image_dir.relative_to(root).as_posix()
    split = SplitIndex(bboxes=[])
    seen = set()
    for row_number, row in enumerate(annotations, start=1):
        fname = str(row["fname"]).strip()
        try:
            label = int(row["class"])
            bbox = [float(row[name]) for name in CARS_ANNO_FIELDS[:4]]
        except (TypeError, ValueError) as err:
            raise DatasetError(
                f"{path}: annotation {row_number} ({fname!r}) has a non-numeric class or box: {err}"
            ) from err
        if not 1 <= label <= num_classes:
            raise DatasetError(
                f"{path}: annotation {row_number} ({fname!r}) has class {label}, outside 1..{num_classes} "
                f"(cars_meta.mat lists {num_classes} classes)"
            )
        if fname in seen:
            raise DatasetError(f"{path}: image {fname!r} is annotated more than once")
        seen.add(fname)
        split.files.append(f"{prefix}/{fname}")
        split.labels.append(label - 1)
        split.bboxes.append(bbox)
    if not split.files:
        raise DatasetError(f"{path}: 'annotations' is empty")
    return split


def _load_mat_variable(path: Path, name: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError or its own MatReadError on a damaged file
        raise DatasetError(f"{path}: cannot read MATLAB file ({type(err).__name__}: {err})") from err
    if name not in content:
        found = sorted(key for key in content if not key.startswith("__"))
        raise DatasetError(f"{path}: no variable {name!r} in the MATLAB file (found {found})")
    return content[name]


# ---------------------------------------------------------------------------------------------------------- helpers


def _read_rows(path: Path, num_fields: int, expected: str) -> list[tuple[Path, int, list[str]]]:
    """(path, 1-based line number, fields) per non-blank line; the last field keeps any spaces."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read index file ({err})") from err
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(None, num_fields - 1) if num_fields == 2 else line.split()
        if len(fields) != num_fields:
            raise DatasetError(f"{path}:{line_number}: expected '{expected}', got {line.strip()!r}")
        rows.append((path, line_number, fields))
    return rows


def _unique_ids(rows: list[tuple[Path, int, list[str]]]) -> list[tuple[Path, int, list[str]]]:
    seen: dict[int, int] = {}
    for path, line, row in rows:
        image_id = _parse_int(row, 0, path, line)
        if image_id in seen:
            raise DatasetError(f"{path}:{line}: image id {image_id} already listed on line {seen[image_id]}")
        seen[image_id] = line
    return rows


def _check_same_ids(reference: dict[int, object], other: dict[int, object], reference_path: Path, path: Path) -> None:
    missing = sorted(set(reference) - set(other))
    if missing:
        raise DatasetError(
            f"{path}: no entry for {len(missing)} image id(s) of {reference_path.name}: {_preview(missing)}"
        )
    extra = sorted(set(other) - set(reference))
    if extra:
        raise DatasetError(f"{path}: {len(extra)} image id(s) not in {reference_path.name}: {_preview(extra)}")


def _parse_int(row: list[str], position: int, path: Path, line: int) -> int:
    try:
        return int(row[position])
    except ValueError:
        raise DatasetError(f"{path}:{line}: expected an integer, got {row[position]!r}") from None


def _parse_float(row: list[str], position: int, path: Path, line: int) -> float:
    try:
        return float(row[position])
    except ValueError:
        raise DatasetError(f"{path}:{line}: expected a number, got {row[position]!r}") from None


def _preview(items: Iterable[object], limit: int = 10) -> str:
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
