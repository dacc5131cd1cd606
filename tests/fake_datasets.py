"""Tiny fake copies of the official CUB-200-2011 and Stanford Cars archives, and of an imagefolder tree.

Each image is a 16x16 solid colour that encodes its class (red channel) and its index (green channel), so a test can
decode any row and check that image and label still belong together. JPEG keeps a flat colour within a few levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 16


def colour(label: int, index: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 8 * index % 256, 128)


def label_of(image: Image.Image) -> int:
    """The class a fake image was drawn for, read back from its red channel."""
    red = np.asarray(image.convert("RGB"))[..., 0].mean()
    return round((red - 40) / 60)


def write_image(path: Path, label: int, index: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour(label, index))
    image.convert(mode).save(path, quality=95) if path.suffix == ".jpg" else image.convert(mode).save(path)


def corrupt_image(path: Path, how: str = "garbage") -> None:
    """Damage an image file: ``'garbage'`` (not an image), ``'truncated'`` (half its bytes) or ``'empty'``."""
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"this is not a JPEG file" * 4)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


@dataclass
class FakeArchive:
    """Where a fake archive lives and what it should load as.

    Attributes:
        data_dir: The folder to pass as ``data_dir``.
        root: The folder the ``file`` column is relative to.
        class_names: Class names in label order.
        train: ``file -> label`` of the official train split.
        test: ``file -> label`` of the official test split.
        bboxes: ``file -> [x_min, y_min, x_max, y_max]`` (empty for an imagefolder tree).
    """

    data_dir: Path
    root: Path
    class_names: list[str]
    train: dict[str, int] = field(default_factory=dict)
    test: dict[str, int] = field(default_factory=dict)
    bboxes: dict[str, list[float]] = field(default_factory=dict)


CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


def make_cub_archive(
    base: Path, class_names: tuple[str, ...] = CUB_CLASSES, num_train: int = 10, num_test: int = 3
) -> FakeArchive:
    """``base/CUB_200_2011/`` with the five index files and ``images/<class>/<file>.jpg``.

    As in the real ``images.txt``, ids run class by class and train and test images alternate within a class.
    """
    root = base / "CUB_200_2011"
    archive = FakeArchive(base, root, list(class_names))
    images, labels, split, boxes = [], [], [], []
    total = num_train + num_test
    test_positions = set(range(1, total, max(1, total // max(num_test, 1)))[:num_test])  # spread over the class
    image_id = 0
    for label, name in enumerate(class_names):
        for index in range(total):
            image_id += 1
            is_train = index not in test_positions
            relative = f"{name}/{name.split('.', 1)[1]}_{image_id:04d}.jpg"
            write_image(root / "images" / relative, label, image_id)
            x, y, w, h = float(index % 4), 2.0, 10.0, 11.0 + index % 3
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {int(is_train)}")
            boxes.append(f"{image_id} {x} {y} {w} {h}")
            (archive.train if is_train else archive.test)[f"images/{relative}"] = label
            archive.bboxes[f"images/{relative}"] = [x, y, x + w, y + h]
    _write_lines(root / "images.txt", images)
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "train_test_split.txt", split)
    _write_lines(root / "bounding_boxes.txt", boxes)
    _write_lines(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(class_names)])
    return archive


CARS_CLASSES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")


def make_cars_archive(
    base: Path,
    class_names: tuple[str, ...] = CARS_CLASSES,
    num_train: int = 10,
    num_test: int = 3,
    test_annos_in_devkit: bool = False,
) -> FakeArchive:
    """``base/`` with ``cars_train/``, ``cars_test/``, ``devkit/{cars_meta,cars_train_annos}.mat`` and
    ``cars_test_annos_withlabels.mat`` (beside ``devkit/``, or inside it), as MATLAB struct arrays like the devkit's.
    """
    archive = FakeArchive(base, base.resolve(), list(class_names))
    for split, count, target in (("train", num_train, archive.train), ("test", num_test, archive.test)):
        rows = []
        number = 0
        for label in range(len(class_names)):
            for _ in range(count):
                number += 1
                fname = f"{number:05d}.jpg"
                write_image(base / f"cars_{split}" / fname, label, number)
                box = (1 + number % 3, 2, 12, 13 + number % 2)
                rows.append((*box, label + 1, fname))
                target[f"cars_{split}/{fname}"] = label
                archive.bboxes[f"cars_{split}/{fname}"] = [float(v) for v in box]
        annos = "devkit/cars_train_annos.mat" if split == "train" else (
            "devkit/cars_test_annos_withlabels.mat" if test_annos_in_devkit else "cars_test_annos_withlabels.mat")
        write_cars_annotations(base / annos, rows)
    write_cars_meta(base / "devkit" / "cars_meta.mat", class_names)
    return archive


CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_cars_annotations(path: Path, rows: list[tuple], fields: tuple[str, ...] = CARS_FIELDS) -> None:
    """Save ``annotations`` as a 1xN MATLAB struct array; each row holds one value per field, in order."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    table = np.zeros((1, len(rows)), dtype=[(name, "O") for name in fields])
    for i, row in enumerate(rows):
        # the devkit stores numbers as 1x1 uint8/uint16 matrices and the file name as a char array
        table[0, i] = tuple(value if isinstance(value, str) else np.array([[value]], dtype=np.uint16) for value in row)
    savemat(path, {"annotations": table})


def write_cars_meta(path: Path, class_names: tuple[str, ...]) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    cells = np.empty((1, len(class_names)), dtype=object)
    for i, name in enumerate(class_names):
        cells[0, i] = name
    savemat(path, {"class_names": cells})


def make_imagefolder(
    base: Path,
    class_names: tuple[str, ...] = ("cat", "dog", "fox"),
    counts: dict[str, int] | None = None,
) -> FakeArchive:
    """``base/<split>/<class>/<n>.png`` for each split in ``counts`` (default: 10 train, 3 test per class)."""
    counts = counts or {"train": 10, "test": 3}
    archive = FakeArchive(base, base.resolve(), sorted(class_names))
    number = 0
    for split, count in counts.items():
        for name in class_names:
            label = archive.class_names.index(name)
            for _ in range(count):
                number += 1
                relative = f"{split}/{name}/{number:03d}.png"
                write_image(base / relative, label, number)
                if split == "train":
                    archive.train[relative] = label
                elif split == "test":
                    archive.test[relative] = label
    return archive


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ hub stand-ins

# Parquet shards per split, as in the real repositories (CUB at 1ef09e0, Cars at 9abf6cf): data/<split>-0000k-of-0000n
HUB_CUB_SHARDS = {"train": 2, "test": 2}
HUB_CARS_SHARDS = {
    "train": 2,
    "test": 2,
    # the seven corrupted copies of test that hub Cars also holds
    "contrast": 1,
    "gaussian_noise": 2,
    "impulse_noise": 2,
    "jpeg_compression": 1,
    "motion_blur": 1,
    "pixelate": 1,
    "spatter": 2,
}


@dataclass
class FakeHubRepo:
    """A local folder laid out like a hub dataset repository, and what it holds.

    Attributes:
        folder: The repository root (holds ``README.md`` and ``data/``).
        class_names: Class names in label order.
        labels: ``split -> labels in row order`` for every split written, corrupted copies included.
        bboxes: ``split -> [x_min, y_min, x_max, y_max] per row`` (empty without a bbox column).
        files: ``split -> Parquet files`` relative to ``folder``.
    """

    folder: Path
    class_names: list[str]
    labels: dict[str, list[int]] = field(default_factory=dict)
    bboxes: dict[str, list[list[float]]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: len(labels) for split, labels in self.labels.items()}


def make_hub_repo(
    folder: Path,
    class_names: tuple[str, ...],
    shards: dict[str, int],
    per_class: dict[str, int] | None = None,
    with_bbox: bool = False,
    label_of_row=None,
) -> FakeHubRepo:
    """Write ``folder/data/<split>-0000k-of-0000n.parquet`` and a dataset card like the ones ``datasets`` pushes.

    Rows are 16x16 images from :func:`colour` (red encodes the class), ``label`` a ClassLabel, and ``bbox`` (when
    ``with_bbox``) four floats. The card declares every split under ``configs``, as the real cards do, so loading the
    folder without ``data_files`` reads them all. ``label_of_row(split, row, label)`` may replace a row's label (to
    make a broken copy). ``per_class`` defaults to 4 train and 3 test rows per class (corrupted copies as test).
    """
    import datasets

    per_class = {"train": 4, "test": 3, **(per_class or {})}
    repo = FakeHubRepo(folder, list(class_names))
    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))}
    if with_bbox:
        columns["bbox"] = datasets.Sequence(datasets.Value("float64"))
    features = datasets.Features(columns)
    for split, count in shards.items():
        rows = per_class.get(split, per_class["test"])
        labels = [label for label in range(len(class_names)) for _ in range(rows)]
        if label_of_row is not None:
            labels = [label_of_row(split, row, label) for row, label in enumerate(labels)]
        data = {"image": [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour(lab, i)) for i, lab in enumerate(labels)]}
        data["label"] = labels
        if with_bbox:
            data["bbox"] = [[float(i % 4), 2.0, 10.0 + i % 3, 12.0] for i in range(len(labels))]
            repo.bboxes[split] = data["bbox"]
        table = datasets.Dataset.from_dict(data, features=features)
        repo.labels[split] = labels
        repo.files[split] = []
        for shard in range(count):
            relative = f"data/{split}-{shard:05d}-of-{count:05d}.parquet"
            (folder / "data").mkdir(parents=True, exist_ok=True)
            table.shard(count, shard, contiguous=True).to_parquet(folder / relative)
            repo.files[split].append(relative)
    _write_hub_card(folder / "README.md", repo, with_bbox)
    return repo


def _write_hub_card(path: Path, repo: FakeHubRepo, with_bbox: bool) -> None:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in repo.labels:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["dataset_info:", "  features:", "  - name: image", "    dtype: image", "  - name: label", "    dtype:"]
    lines += ["      class_label:", "        names:"]
    lines += [f"          '{i}': {name}" for i, name in enumerate(repo.class_names)]
    if with_bbox:
        lines += ["  - name: bbox", "    sequence: float64"]
    lines += ["  splits:"]
    for split, size in repo.split_sizes.items():
        lines += [f"  - name: {split}", "    num_bytes: 1000", f"    num_examples: {size}"]
    lines += ["---", "", "A local stand-in of a hub dataset repository, made by the tests."]
    _write_lines(path, lines)


# A source with an official validation split, one Parquet shard per split, as datasets' Parquet conversion writes it
STAND_IN_CLASSES = ("circle", "square", "triangle")
STAND_IN_SHARDS = {"train": 1, "validation": 1, "test": 1}


def make_validation_hub_repo(
    folder: Path,
    class_names: tuple[str, ...] = STAND_IN_CLASSES,
    per_class: dict[str, int] | None = None,
    label_of_row=None,
) -> FakeHubRepo:
    """A stand-in of a hub repository whose source ships train, validation and test splits.

    ``folder/data/{train,validation,test}-00000-of-00001.parquet`` (16x16 images embedded, ``label`` a ClassLabel)
    and a dataset card, via :func:`make_hub_repo`. ``per_class`` defaults to 8 train, 3 validation and 3 test rows
    per class; ``label_of_row`` as there.
    """
    counts = {"train": 8, "validation": 3, "test": 3, **(per_class or {})}
    return make_hub_repo(folder, class_names, STAND_IN_SHARDS, per_class=counts, label_of_row=label_of_row)


def stand_in_spec(name: str, repo: FakeHubRepo, **changes):
    """The registry entry a user would write for ``repo``: its hub copy (the folder, each split's Parquet files),
    its official splits and their sizes (validation included), its class count. ``changes`` replace fields."""
    from timm_bninit.data.registry import DatasetSpec, HubCopy

    fields = {
        "name": name,
        "num_classes": len(repo.class_names),
        "split_sizes": repo.split_sizes,
        "hub": HubCopy(str(repo.folder), None, data_files={split: f"data/{split}-*.parquet" for split in repo.labels}),
        **changes,
    }
    return DatasetSpec(**fields)


def tiny_config(data_root: Path, cache: Path, **changes) -> Any:
    """The demo recipe on the ``tiny_data`` imagefolder (conftest.py): test_resnet, 16 px, 2 epochs, seconds a run."""
    from dataclasses import replace

    from timm_bninit.experiment.recipe import load_recipe

    config = replace(load_recipe("demo"), dataset="imagefolder", data_dir=str(data_root / "folder"),
                     model="test_resnet", img_size=16, epochs=2, batch_size=6, num_workers=0, precise_bn_batches=2,
                     val_fraction=0.25, lr=0.05)
    return replace(config, **changes)


def kill_after_checkpoint(process, run_dir: Path, epoch: int = 2, timeout: float = 300) -> None:
    """SIGKILL ``process`` once ``run_dir``'s checkpoint holds ``epoch`` finished epochs (a kill mid-run)."""
    import json
    import signal
    import time

    state = run_dir / "checkpoint" / "trainer_state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["state"]["epoch"] >= epoch:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
