"""Hub copies of CUB and Cars, read offline from local stand-ins of their repositories.

Each stand-in is a folder laid out like the real repository at its pinned commit
(``data/<split>-0000k-of-0000n.parquet`` and a dataset card declaring every split), made by the tests. It is read by
the same ``datasets.load_dataset`` call as the hub; only the repository id of the registry entry's hub copy is
swapped for the folder, with the stand-in's smaller split sizes.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from fake_datasets import CARS_CLASSES, CUB_CLASSES, HUB_CARS_SHARDS, HUB_CUB_SHARDS, label_of, make_hub_repo

from timm_bninit.data import DatasetError, get_dataset, load_image_dataset
from timm_bninit.data import registry as data_registry
from timm_bninit.data.hub import load_hub_dataset

CORRUPTED = [split for split in HUB_CARS_SHARDS if split not in ("train", "test")]


pytestmark = pytest.mark.usefixtures("offline_hub")  # conftest.py: no test may reach a hub


def stand_in(kind: str, folder: Path, **kwargs) -> tuple:
    """``(FakeHubRepo, DatasetSpec)``: a stand-in of ``kind``'s repository and the real entry pointed at it."""
    if kind == "cars":
        repo = make_hub_repo(folder, CARS_CLASSES, HUB_CARS_SHARDS, **kwargs)
    else:
        repo = make_hub_repo(folder, CUB_CLASSES, HUB_CUB_SHARDS, with_bbox=True, **kwargs)
    sizes = {split: repo.split_sizes[split] for split in ("train", "test")}
    spec = get_dataset(kind)
    return repo, replace(spec, hub=replace(spec.hub, repo=str(folder)), split_sizes=sizes,
                         num_classes=len(repo.class_names))


def arrow_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.arrow"))


# ------------------------------------------------------------------------------------------------ what is read


def test_the_pins_name_full_commits_and_select_only_train_and_test_of_the_real_layouts():
    # the file listings of the two repositories at their pinned commits, as the hub shows them
    real_cars = [f"data/{s}-{k:05d}-of-{n:05d}.parquet" for s, n in HUB_CARS_SHARDS.items() for k in range(n)]
    real_cub = [f"data/{s}-{k:05d}-of-00002.parquet" for s in ("train", "test") for k in range(2)]
    assert get_dataset("cars").hub.revision == "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40"
    assert get_dataset("cub").hub.revision == "1ef09e021b0b65b40337f6f285909656f407f6e0"
    for kind, files in (("cars", [*real_cars, "README.md"]), ("cub", [*real_cub, "README.md", "script.py"])):
        selected = {split: fnmatch.filter(files, glob) for split, glob in get_dataset(kind).hub.data_files.items()}
        assert selected == {split: [f"data/{split}-0000{k}-of-00002.parquet" for k in range(2)] for split in selected}
        assert set(selected) == {"train", "test"}
    assert get_dataset("cub").split_sizes == {"train": 5994, "test": 5794} and get_dataset("cub").num_classes == 200
    assert get_dataset("cars").split_sizes == {"train": 8144, "test": 8041} and get_dataset("cars").num_classes == 196


def test_the_stand_in_reproduces_the_nine_splits_that_a_plain_load_dataset_would_prepare(tmp_path):
    # what load_dataset(repo) does to hub Cars, and therefore what the pinned data_files must avoid
    repo, _ = stand_in("cars", tmp_path / "stanford_cars")
    everything = datasets.load_dataset(str(repo.folder), cache_dir=str(tmp_path / "plain"))
    assert sorted(everything) == sorted(HUB_CARS_SHARDS) and len(everything) == 9
    assert len(arrow_files(tmp_path / "plain")) == 9


def test_cars_reads_train_and_test_only_with_labels_and_images_matching(tmp_path):
    repo, copy = stand_in("cars", tmp_path / "stanford_cars")
    cache = tmp_path / "cache"
    data = load_hub_dataset(copy, cache)
    assert sorted(data) == ["test", "train"]
    assert {s: len(data[s]) for s in data} == {"train": 12, "test": 9}
    for split in ("train", "test"):
        assert data[split].column_names == ["image", "label"]  # hub Cars has no boxes
        assert data[split]["label"] == repo.labels[split]
        assert [label_of(row["image"]) for row in data[split]] == repo.labels[split]
    assert data["train"].features["label"].names == list(CARS_CLASSES)
    # only train and test were prepared: one Arrow file each, none for the seven corrupted copies
    assert [re.sub(r"^.*-(\w+)\.arrow$", r"\1", name) for name in arrow_files(cache)] == ["test", "train"]


def test_the_corrupted_copies_are_never_opened(tmp_path):
    repo, copy = stand_in("cars", tmp_path / "stanford_cars")
    for split in CORRUPTED:
        for relative in repo.files[split]:
            (repo.folder / relative).write_bytes(b"not a parquet file")  # reading any of them would fail
    data = load_hub_dataset(copy, tmp_path / "cache")
    assert {s: len(data[s]) for s in data} == {"train": 12, "test": 9}


def test_cub_keeps_its_boxes_as_four_float32_in_xyxy_order(tmp_path):
    repo, copy = stand_in("cub", tmp_path / "cub")
    data = load_hub_dataset(copy, tmp_path / "cache")
    assert data["train"].column_names == ["image", "label", "bbox"]
    assert data["train"].features["bbox"] == datasets.Sequence(datasets.Value("float32"), length=4)
    for split in ("train", "test"):
        assert data[split]["bbox"] == repo.bboxes[split]  # small integers and halves: exact in float32
        assert data[split]["label"] == repo.labels[split]


def test_integer_labels_become_a_class_label_and_extra_columns_are_dropped(tmp_path):
    # a copy whose label column is plain integers (no ClassLabel) and that carries a column this project does not use
    folder = tmp_path / "plain"
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64"), "extra": datasets.Value("string")}
    )
    for split, rows in (("train", 6), ("test", 3)):
        labels = [i % 3 for i in range(rows)]
        data = {"image": [_image(label, i) for i, label in enumerate(labels)], "label": labels, "extra": ["x"] * rows}
        (folder / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(data, features=features).to_parquet(folder / f"data/{split}-00000-of-00001.parquet")
    cub = get_dataset("cub")
    copy = replace(cub, hub=replace(cub.hub, repo=str(folder)), split_sizes={"train": 6, "test": 3}, num_classes=3)
    data = load_hub_dataset(copy, tmp_path / "cache")
    assert data["train"].column_names == ["image", "label"]
    assert data["train"].features["label"].names == ["0", "1", "2"]  # integers kept, not renumbered as strings
    assert data["train"]["label"] == [0, 1, 2, 0, 1, 2]


def _image(label: int, index: int):
    from fake_datasets import IMAGE_SIZE, colour
    from PIL import Image

    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour(label, index))


# ------------------------------------------------------------------------------------------------ entry point


@pytest.fixture
def cars_on_disk(tmp_path, monkeypatch):
    """Hub Cars' entry pointed at a stand-in; ``datasets.load_dataset`` still runs, with its calls recorded."""
    repo, copy = stand_in("cars", tmp_path / "stanford_cars")
    monkeypatch.setitem(data_registry._DATASETS, "cars", copy)
    calls, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or real(path, **kw))
    return repo, calls


def test_entry_point_reads_the_pinned_commit_and_records_it(tmp_path, cars_on_disk):
    repo, calls = cars_on_disk
    data, info = load_image_dataset("cars", cache_dir=tmp_path / "cache", val_fraction=0.25)
    path, kwargs = calls[0]
    assert path == str(repo.folder) and kwargs["revision"] == "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40"
    assert kwargs["data_files"] == {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}
    assert kwargs["cache_dir"] == str(tmp_path / "cache" / "hub")
    assert info.origin == "hub" and info.source == str(repo.folder)
    assert info.revision == "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40" and info.to_dict()["revision"] == info.revision
    assert info.split_sizes == {"train": 9, "validation": 3, "test": 9}
    # hub Cars has no boxes: no bbox column anywhere, and the info says so
    assert not info.has_bbox and info.bbox_format is None
    assert all("bbox" not in split.column_names for split in data.values())


def test_hub_revision_overrides_the_pin_and_is_recorded(tmp_path, cars_on_disk):
    _, calls = cars_on_disk
    _, info = load_image_dataset("cars", cache_dir=tmp_path / "cache", val_fraction=0, hub_revision="refs/pr/1")
    assert calls[0][1]["revision"] == "refs/pr/1" and info.revision == "refs/pr/1"


def test_cub_through_the_entry_point_has_boxes(tmp_path, monkeypatch):
    repo, copy = stand_in("cub", tmp_path / "cub")
    monkeypatch.setitem(data_registry._DATASETS, "cub", copy)
    data, info = load_image_dataset("cub", cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert info.has_bbox and info.bbox_format == "xyxy" and info.class_names == list(CUB_CLASSES)
    assert info.revision == "1ef09e021b0b65b40337f6f285909656f407f6e0"
    assert set(data) == {"train", "validation", "test"} and data["test"]["bbox"] == repo.bboxes["test"]


@pytest.mark.parametrize("name, data_dir", [("cub", "local"), ("digits", None)])
def test_hub_revision_without_a_hub_copy_is_refused(tmp_path, name, data_dir):
    folder = None
    if data_dir:
        folder = tmp_path / "cub_archive"
        folder.mkdir()
    with pytest.raises(DatasetError) as raised:
        load_image_dataset(name, data_dir=folder, cache_dir=tmp_path / "cache", hub_revision="abc123")
    message = str(raised.value)
    assert "\n" not in message and "hub_revision='abc123'" in message and "drop hub_revision" in message
    assert (str(folder) if folder else "'digits', which has no hub copy") in message


def test_the_real_hub_path_offline_names_the_pinned_commit(tmp_path):
    # the real datasets.load_dataset against the real repository id, in offline mode: nothing is mocked
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("cars", cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "'tanganke/stanford_cars' at revision 9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40" in message
    assert "OfflineModeIsEnabled" in message and "data_dir=" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------ broken copies


def test_wrong_split_sizes_say_what_was_found_and_what_was_expected(tmp_path):
    repo, copy = stand_in("cars", tmp_path / "stanford_cars")
    with pytest.raises(DatasetError) as raised:
        load_hub_dataset(replace(copy, split_sizes={"train": 8144, "test": 8041}), tmp_path / "cache")
    message = str(raised.value)
    assert message == (
        f"hub copy {str(repo.folder)!r} at revision 9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40 has 12 train / 9 test "
        "rows, expected the official 8,144 train / 8,041 test; pass another hub_revision, or data_dir=<the folder "
        "holding cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat>"
    )


def test_a_constant_test_label_is_refused(tmp_path):
    # the circulated broken Cars copy: every test image labelled with the first class
    _, copy = stand_in("cars", tmp_path / "stanford_cars", label_of_row=lambda split, row, label: (
        0 if split == "test" else label))
    with pytest.raises(DatasetError, match=r"split 'test' has no image of 2 of its 3 classes \(labels 1, 2; found 1 "
                       r"distinct labels\), expected every class in train and test: its label column is broken"):
        load_hub_dataset(copy, tmp_path / "cache")


def test_a_class_missing_from_train_is_refused(tmp_path):
    # class 2's train rows relabelled as class 1: sizes still right, one class never seen in training
    _, copy = stand_in("cub", tmp_path / "cub", label_of_row=lambda split, row, label: (
        1 if split == "train" and label == 2 else label))
    with pytest.raises(DatasetError, match=r"split 'train' has no image of 1 of its 3 classes \(labels 2;"):
        load_hub_dataset(copy, tmp_path / "cache")


def test_a_label_outside_the_classes_is_refused(tmp_path):
    # -1 is ClassLabel's "no label", which datasets accepts
    _, copy = stand_in("cars", tmp_path / "stanford_cars", label_of_row=lambda split, row, label: (
        -1 if split == "test" and row == 0 else label))
    with pytest.raises(DatasetError, match=r"split 'test' has labels outside 0\.\.2: \[-1\]"):
        load_hub_dataset(copy, tmp_path / "cache")


def test_a_wrong_number_of_classes_is_refused(tmp_path):
    _, copy = stand_in("cars", tmp_path / "stanford_cars")
    with pytest.raises(DatasetError, match=r"declares 3 classes, expected 196; pass another hub_revision"):
        load_hub_dataset(replace(copy, num_classes=196), tmp_path / "cache")


def test_missing_test_files_are_a_one_line_error(tmp_path):
    repo, copy = stand_in("cars", tmp_path / "stanford_cars")
    for relative in repo.files["test"]:
        (repo.folder / relative).unlink()
    with pytest.raises(DatasetError) as raised:
        load_hub_dataset(copy, tmp_path / "cache")
    message = str(raised.value)
    assert message.startswith(
        "could not load 'cars' (train data/train-*.parquet, test data/test-*.parquet) from its Hugging Face hub copy "
        f"{str(repo.folder)!r} at revision 9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40 ("
    )
    assert "\n" not in message and message.endswith(
        "check hub access and hub_revision, or pass a local data dir instead: data_dir=<the folder holding cars_train/,"
        " cars_test/, devkit/ and cars_test_annos_withlabels.mat>"
    )

