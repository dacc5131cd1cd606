"""Data layer: official CUB / Cars archives, imagefolder trees, digits, the hub error, the cache, the validation split,
errors for bad data, and lazily applied transforms. Every data set is a tiny fake made in tmp_path."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from fake_datasets import (
    CARS_FIELDS,
    corrupt_image,
    label_of,
    make_cars_archive,
    make_cub_archive,
    make_imagefolder,
    write_cars_annotations,
    write_cars_meta,
    write_image,
)
from PIL import Image
from torchvision import transforms as T

from timm_bninit.data import (
    DatasetError,
    ImageDatasetInfo,
    ImageTransform,
    add_validation_split,
    load_image_dataset,
    resolve_source,
    with_transforms,
)
from timm_bninit.data import local as data_local

pytestmark = pytest.mark.usefixtures("offline_hub")  # conftest.py: no test may reach a hub


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def load(name, archive=None, cache_dir=None, **kwargs):
    return load_image_dataset(name, data_dir=None if archive is None else archive.data_dir, cache_dir=cache_dir,
                              **kwargs)


def files(split) -> list[str]:
    return column(split, "file")


def column(split, name: str) -> list:
    return list(split[name])  # datasets >= 4 returns a lazy Column


def assert_rows_match_files(split, expected_labels: dict[str, int]) -> None:
    """Each row's label is the archive's label for its file, and the decoded image was drawn for that label."""
    for row in split:
        assert row["label"] == expected_labels[row["file"]], row["file"]
        assert label_of(row["image"]) == row["label"], row["file"]


# ------------------------------------------------------------------------------------------------ official archives


def test_cub_archive_loads_official_splits_labels_and_boxes(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    data, info = load("cub", archive, cache, val_fraction=0.2)

    assert list(data) == ["train", "validation", "test"]
    assert isinstance(data["train"].features["image"], datasets.Image)
    assert data["train"].features["label"] == datasets.ClassLabel(names=archive.class_names)
    assert set(files(data["train"])) | set(files(data["validation"])) == set(archive.train)
    assert sorted(files(data["test"])) == sorted(archive.test)
    for split in data.values():
        assert_rows_match_files(split, archive.train | archive.test)
        for row in split:  # bounding_boxes.txt's <x> <y> <w> <h> became [x_min, y_min, x_max, y_max]
            assert row["bbox"] == pytest.approx(archive.bboxes[row["file"]])
    assert info.name == "cub" and info.origin == "local"
    assert info.source == str(archive.root.resolve())
    assert info.class_names == archive.class_names and info.num_classes == 3
    assert info.has_bbox and info.bbox_format == "xyxy"
    assert info.split_sizes == {"train": 24, "validation": 6, "test": 9}
    assert info.skipped == [] and info.num_skipped == 0


def test_cub_data_dir_may_be_the_archive_folder_itself_or_a_bare_path(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    via_parent, _ = load_image_dataset("cub", data_dir=archive.data_dir, cache_dir=cache)
    via_folder, info = load_image_dataset("CUB200", data_dir=archive.root, cache_dir=cache)
    via_path, _ = load_image_dataset(str(archive.data_dir), cache_dir=cache)
    assert files(via_folder["test"]) == files(via_parent["test"]) == files(via_path["test"])
    assert info.from_cache  # same resolved root, so the same cache entry


@pytest.mark.parametrize("test_annos_in_devkit", [False, True])
def test_cars_archive_loads_one_based_labels_and_boxes(tmp_path, cache, test_annos_in_devkit):
    archive = make_cars_archive(tmp_path / "cars", test_annos_in_devkit=test_annos_in_devkit)
    data, info = load("cars", archive, cache, val_fraction=0.2)

    assert data["train"].features["label"].names == archive.class_names
    assert set(files(data["train"])) | set(files(data["validation"])) == set(archive.train)
    assert sorted(files(data["test"])) == sorted(archive.test)
    for split in data.values():
        assert_rows_match_files(split, archive.train | archive.test)
        for row in split:
            assert row["bbox"] == pytest.approx(archive.bboxes[row["file"]])
    assert info.name == "cars" and info.num_classes == 3 and info.bbox_format == "xyxy"


def test_cars_accepts_torchvision_style_parent_folder_and_detects_the_layout(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "root" / "stanford_cars")
    assert resolve_source(tmp_path / "root") == ("cars", tmp_path / "root")
    data, info = load_image_dataset(tmp_path / "root", cache_dir=cache, val_fraction=0.2)
    assert info.name == "cars" and sorted(files(data["test"])) == sorted(archive.test)


def test_cars_images_nested_one_level_deeper_are_found(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    for split in ("train", "test"):  # the Kaggle mirror's cars_train/cars_train/00001.jpg
        folder = tmp_path / "cars" / f"cars_{split}"
        folder.rename(tmp_path / "moved")
        folder.mkdir()
        (tmp_path / "moved").rename(folder / folder.name)
    data, _ = load("cars", archive, cache, val_fraction=0.2)
    assert all(file.startswith("cars_test/cars_test/") for file in files(data["test"]))
    assert_rows_match_files(data["test"], {f"cars_test/{f}": v for f, v in archive.test.items()})


def test_imagefolder_tree_loads_with_folder_class_names(tmp_path, cache):
    archive = make_imagefolder(tmp_path / "tree", class_names=("zebra", "ant", "moth"))
    data, info = load("imagefolder", archive, cache, val_fraction=0.2)
    assert info.class_names == ["ant", "moth", "zebra"]
    assert set(files(data["train"])) | set(files(data["validation"])) == set(archive.train)
    assert sorted(files(data["test"])) == sorted(archive.test)
    for split in data.values():
        assert_rows_match_files(split, archive.train | archive.test)
    assert not info.has_bbox and "bbox" not in data["train"].column_names
    assert resolve_source(tmp_path / "tree")[0] == "imagefolder"


def test_imagefolder_with_its_own_validation_split_keeps_it(tmp_path, cache):
    make_imagefolder(tmp_path / "tree", counts={"train": 4, "validation": 2, "test": 2})
    data, info = load_image_dataset(tmp_path / "tree", cache_dir=cache)
    assert info.split_sizes == {"train": 12, "validation": 6, "test": 6}
    assert all(file.startswith("validation/") for file in files(data["validation"]))
    assert info.val_fraction is None and info.split_seed is None


def test_digits_demo_set_is_offline_rgb_and_split_as_documented(cache):
    data, info = load_image_dataset("digits", cache_dir=cache)
    assert info.origin == "builtin" and info.class_names == [str(d) for d in range(10)]
    assert info.split_sizes == {"train": 1293, "validation": 144, "test": 360}  # 1437 / 360 official, 10% val
    image = data["test"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    from sklearn.datasets import load_digits

    digits = load_digits()
    test_rows = [int(f.split("/")[1]) for f in files(data["test"])]
    assert column(data["test"], "label") == digits.target[test_rows].tolist()
    # the official 80/20 test split is stratified: every digit has 36 +- 1 test images
    assert all(35 <= n <= 37 for n in Counter(data["test"]["label"]).values())
    assert len(set(test_rows) | {int(f.split("/")[1]) for s in ("train", "validation") for f in files(data[s])}) == 1797


# ------------------------------------------------------------------------------------------------ hub copies


def test_hub_unreachable_without_local_dir_says_to_pass_a_data_dir(tmp_path):
    # the real datasets.load_dataset runs, in offline mode (the offline_hub fixture); nothing is mocked
    with pytest.raises(DatasetError, match="bentrevett/caltech-ucsd-birds-200-2011") as raised:
        load_image_dataset("cub", cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "data_dir=" in message and "CUB_200_2011" in message and "OfflineModeIsEnabled" in message
    assert isinstance(raised.value.__cause__, Exception)  # the hub's own error is kept as the cause
    with pytest.raises(DatasetError, match=r"tanganke/stanford_cars.*data_dir=.*cars_train"):
        load_image_dataset("cars", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ cache


def test_second_load_comes_from_the_cache_without_reading_or_decoding(tmp_path, cache, monkeypatch):
    archive = make_cub_archive(tmp_path / "cub")
    first, info1 = load("cub", archive, cache)
    entries = sorted(p.name for p in cache.iterdir())

    def fail(*args, **kwargs):
        raise AssertionError("the archive was parsed or decoded again")

    monkeypatch.setattr("timm_bninit.data.archives.read_cub_index", fail)
    monkeypatch.setattr(data_local, "find_unreadable_images", fail)
    second, info2 = load("cub", archive, cache)
    assert (info1.from_cache, info2.from_cache) == (False, True)
    assert info1.cache_path == info2.cache_path and sorted(p.name for p in cache.iterdir()) == entries
    assert files(second["train"]) == files(first["train"]) and files(second["test"]) == files(first["test"])
    build = json.loads((Path(info2.cache_path) / "build.json").read_text())
    assert build["source"] == str(archive.root.resolve()) and build["class_names"] == archive.class_names


def test_cache_holds_the_image_bytes_so_rows_decode_after_the_archive_is_gone(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    data, _ = load("cub", archive, cache)
    shutil.rmtree(archive.root)
    assert_rows_match_files(data["test"], archive.test)


@pytest.mark.parametrize("change", ["index_file", "image_file"])
def test_a_changed_archive_rebuilds_and_replaces_its_old_entry(tmp_path, cache, change):
    archive = make_cub_archive(tmp_path / "cub")
    _, before = load("cub", archive, cache)
    if change == "index_file":
        classes = archive.root / "classes.txt"
        classes.write_text(classes.read_text().replace("Sooty_Albatross", "Renamed_Albatross"))
    else:
        write_image(archive.root / "images" / next(iter(archive.train)).removeprefix("images/"), 0, 99, mode="L")
    data, after = load("cub", archive, cache)
    assert not after.from_cache and after.cache_path != before.cache_path
    assert [p.name for p in cache.iterdir()] == [Path(after.cache_path).name]  # stale entry pruned
    if change == "index_file":
        assert after.class_names[2] == "003.Renamed_Albatross"
        assert data["train"].features["label"].names[2] == "003.Renamed_Albatross"


def test_cache_dir_inside_the_image_folder_does_not_invalidate_itself(tmp_path):
    archive = make_imagefolder(tmp_path / "tree")
    inside = tmp_path / "tree" / ".cache"
    _, first = load("imagefolder", archive, inside)
    _, second = load("imagefolder", archive, inside)
    assert (first.from_cache, second.from_cache) == (False, True)


def test_digits_are_cached_too(cache):
    _, first = load_image_dataset("digits", cache_dir=cache)
    _, second = load_image_dataset("digits", cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)


# ------------------------------------------------------------------------------------------------ validation split


def labelled(counts: dict[int, int]) -> datasets.DatasetDict:
    """Images-free official splits: a ``row`` id and a ClassLabel ``label`` with ``counts[c]`` train rows."""
    labels = [c for c, n in counts.items() for _ in range(n)]
    random.Random(0).shuffle(labels)
    label = datasets.ClassLabel(num_classes=len(counts))
    features = datasets.Features({"row": datasets.Value("int64"), "label": label})
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": labels}, features=features),
        test=datasets.Dataset.from_dict({"row": [-1, -2], "label": [0, 1]}, features=features),
    )


COUNTS = {0: 30, 1: 60, 2: 11, 3: 9, 4: 120}


def test_validation_split_is_stratified_per_class():
    split = add_validation_split(labelled(COUNTS), val_fraction=0.2, split_seed=0)
    val = Counter(split["validation"]["label"])
    assert len(split["validation"]) == int(np.ceil(0.2 * sum(COUNTS.values())))
    for c, n in COUNTS.items():
        assert abs(val[c] - 0.2 * n) <= 1, (c, val[c], n)  # each class's share within one image of its fraction


def test_validation_split_is_disjoint_and_train_plus_validation_is_the_official_train():
    original = labelled(COUNTS)
    split = add_validation_split(original, val_fraction=0.1, split_seed=0)
    train, val = column(split["train"], "row"), column(split["validation"], "row")
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(column(original["train"], "row"))
    assert column(split["test"], "row") == column(original["test"], "row")
    assert train == sorted(train) and val == sorted(val)  # original order kept in both parts


def test_validation_split_depends_only_on_split_seed_not_on_global_random_state():
    original = labelled(COUNTS)
    draws = []
    for global_seed in (0, 1, 12345):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        draws.append(column(add_validation_split(original, val_fraction=0.1, split_seed=7)["validation"], "row"))
        np.random.random(size=100)  # disturb the global streams between draws too
        torch.rand(100)
    assert draws[0] == draws[1] == draws[2]
    other_seed = column(add_validation_split(original, val_fraction=0.1, split_seed=8)["validation"], "row")
    assert other_seed != draws[0]


def test_validation_split_through_the_loader_is_deterministic_and_stratified(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub", num_train=20, num_test=2)
    torch.manual_seed(1)
    first, _ = load("cub", archive, cache, val_fraction=0.25, split_seed=3)
    torch.manual_seed(2)
    np.random.seed(2)
    second, _ = load("cub", archive, cache, val_fraction=0.25, split_seed=3)
    assert files(first["validation"]) == files(second["validation"])
    assert Counter(first["validation"]["label"]) == {0: 5, 1: 5, 2: 5}
    assert set(files(first["train"])) | set(files(first["validation"])) == set(archive.train)


def test_zero_val_fraction_gives_an_empty_validation_split():
    split = add_validation_split(labelled(COUNTS), val_fraction=0.0)
    assert len(split["validation"]) == 0 and len(split["train"]) == sum(COUNTS.values())


@pytest.mark.parametrize(
    ("counts", "fraction", "message"),
    [
        ({0: 5, 1: 1}, 0.2, "at least 2 training images per class; 1 class.* have only 1"),
        ({0: 5, 1: 5, 2: 5}, 0.1, "leaves 13 for training and 2 for validation.*at least one image per class"),
    ],
)
def test_unstratifiable_validation_split_is_a_clear_error(counts, fraction, message):
    with pytest.raises(DatasetError, match=message):
        add_validation_split(labelled(counts), val_fraction=fraction)


def test_val_fraction_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        add_validation_split(labelled(COUNTS), val_fraction=1.0)


# ------------------------------------------------------------------------------------------------ bad data


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "index_file", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt"]
)
def test_cub_missing_index_file_is_named(tmp_path, cache, index_file):
    archive = make_cub_archive(tmp_path / "cub")
    (archive.root / index_file).unlink()
    with pytest.raises(DatasetError, match=f"missing the index file '{index_file}'"):
        load("cub", archive, cache)


def test_cub_missing_folders_are_named(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    shutil.rmtree(archive.root / "images")
    with pytest.raises(DatasetError, match="missing the folder 'images'"):
        load("cub", archive, cache)
    with pytest.raises(DatasetError, match=r"no CUB-200-2011 archive in .*expected CUB_200_2011/images.txt"):
        load_image_dataset("cub", data_dir=tmp_path, cache_dir=cache)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_dataset("cub", data_dir=tmp_path / "nowhere", cache_dir=cache)


@pytest.mark.parametrize("bad_label", ["0", "4"])
def test_cub_label_outside_class_range_names_file_and_line(tmp_path, cache, bad_label):
    archive = make_cub_archive(tmp_path / "cub")
    rewrite(archive.root / "image_class_labels.txt", "\n2 1\n", f"\n2 {bad_label}\n")
    with pytest.raises(DatasetError, match=rf"image_class_labels.txt:2: class id {bad_label} .* outside 1\.\.3"):
        load("cub", archive, cache)


def test_cub_class_without_images_is_an_error(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    with (archive.root / "classes.txt").open("a") as file:
        file.write("4 004.Groove_billed_Ani\n")
    with pytest.raises(DatasetError, match=r"1 of 4 classes have no images: 004.Groove_billed_Ani"):
        load("cub", archive, cache)


def test_cub_class_without_training_images_is_an_error(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    split = archive.root / "train_test_split.txt"
    lines = split.read_text().splitlines()
    labels = dict(line.split() for line in (archive.root / "image_class_labels.txt").read_text().splitlines())
    split.write_text("\n".join(f"{i} 0" if labels[i] == "3" else f"{i} {s}" for i, s in map(str.split, lines)))
    with pytest.raises(DatasetError, match=r"1 of 3 classes have no training images: 003.Sooty_Albatross"):
        load("cub", archive, cache)


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("images.txt", "\n2 ", "\n2x ", r"images.txt:2: expected an integer, got '2x'"),
        ("bounding_boxes.txt", "\n3 ", "\n3 1.0\n", r"bounding_boxes.txt:3: expected '<image_id> <x> <y> <w> <h>'"),
        ("train_test_split.txt", "\n2 0\n", "\n2 7\n", r"train_test_split.txt:2: is_training_image must .* got '7'"),
        ("image_class_labels.txt", "\n2 1\n", "\n", r"image_class_labels.txt: no entry for 1 image id\(s\) .*: 2"),
        ("image_class_labels.txt", "\n2 1\n", "\n2 1\n2 1\n", r"image_class_labels.txt:3: image id 2 already listed"),
        ("classes.txt", "2 002", "5 002", r"classes.txt: class ids must run 1, 2, \.\.\., N"),
    ],
)
def test_cub_malformed_index_files_are_named(tmp_path, cache, file, old, new, message):
    archive = make_cub_archive(tmp_path / "cub")
    rewrite(archive.root / file, old, new)
    with pytest.raises(DatasetError, match=message):
        load("cub", archive, cache)


@pytest.mark.parametrize(
    ("how", "reason"),
    [("garbage", "cannot decode"), ("truncated", "cannot decode"), ("empty", "cannot"), ("deleted", "file not found")],
)
def test_unreadable_image_fails_the_build_naming_the_file(tmp_path, cache, how, reason):
    archive = make_cub_archive(tmp_path / "cub")
    bad = sorted(archive.test)[1]
    if how == "deleted":
        (archive.root / bad).unlink()
    else:
        corrupt_image(archive.root / bad, how)
    with pytest.raises(DatasetError, match=rf"1 image\(s\) .* cannot be read: {bad}: {reason}.*skip_corrupt=True"):
        load("cub", archive, cache)
    assert not any(p.name.startswith("cub-") for p in cache.iterdir())  # nothing cached from a failed build


def test_truncated_jpeg_passes_pil_verify_but_not_the_build(tmp_path, cache):
    # the reason the check decodes the pixels: Image.verify() accepts this file
    archive = make_cub_archive(tmp_path / "cub")
    bad = archive.root / sorted(archive.train)[0]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad, quality=95)  # enough scan data that half the file still holds the headers
    corrupt_image(bad, "truncated")
    with Image.open(bad) as image:
        image.verify()
    with pytest.raises(DatasetError, match="cannot decode"):
        load("cub", archive, cache)


def test_skip_corrupt_leaves_bad_images_out_and_records_them(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub")
    bad_train, bad_test = sorted(archive.train)[0], sorted(archive.test)[0]
    corrupt_image(archive.root / bad_train, "garbage")
    (archive.root / bad_test).unlink()

    data, info = load("cub", archive, cache, skip_corrupt=True)
    assert info.num_skipped == 2
    assert {(s.path, s.split) for s in info.skipped} == {(bad_train, "train"), (bad_test, "test")}
    assert {s.path: s.reason for s in info.skipped}[bad_test] == "file not found"
    assert info.to_dict()["skipped"][0].keys() == {"path", "split", "reason"} and info.to_dict()["num_skipped"] == 2
    kept = set(files(data["train"])) | set(files(data["validation"])) | set(files(data["test"]))
    assert kept == (set(archive.train) | set(archive.test)) - {bad_train, bad_test}

    _, again = load("cub", archive, cache, skip_corrupt=True)
    assert again.from_cache and again.skipped == info.skipped
    with pytest.raises(DatasetError, match=f"cannot be read: .*{bad_train}"):  # cached, but still not silent
        load("cub", archive, cache)


def test_skipping_that_empties_a_class_is_still_an_error(tmp_path, cache):
    archive = make_cub_archive(tmp_path / "cub", num_train=2, num_test=1)
    for file, label in archive.train.items():
        if label == 1:
            corrupt_image(archive.root / file)
    with pytest.raises(DatasetError, match=r"after skipping 2 unreadable.*no training images: 002.Laysan_Albatross"):
        load("cub", archive, cache, skip_corrupt=True)


def test_cars_missing_labelled_test_annotations_is_explained(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    (archive.data_dir / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"missing the index file 'cars_test_annos_withlabels.mat'.*has no labels"):
        load("cars", archive, cache)


@pytest.mark.parametrize("name", ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat"])
def test_cars_missing_devkit_file_is_named(tmp_path, cache, name):
    archive = make_cars_archive(tmp_path / "cars")
    (archive.data_dir / name).unlink()
    with pytest.raises(DatasetError, match=f"missing the index file '{name}'"):
        load("cars", archive, cache)


def test_cars_missing_image_folder_is_named(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    shutil.rmtree(archive.data_dir / "cars_test")
    with pytest.raises(DatasetError, match="missing the folder 'cars_test'"):
        load("cars", archive, cache)


def test_cars_class_outside_range_names_file_and_image(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    write_cars_annotations(archive.data_dir / "devkit" / "cars_train_annos.mat",
                           [(1, 1, 9, 9, 1, "00001.jpg"), (1, 1, 9, 9, 4, "00002.jpg")])
    with pytest.raises(DatasetError, match=r"cars_train_annos.mat: annotation 2 \('00002.jpg'\) has class 4, "
                                           r"outside 1\.\.3"):
        load("cars", archive, cache)


def test_cars_unlabelled_test_annotations_are_recognised(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    no_class = tuple(f for f in CARS_FIELDS if f != "class")
    write_cars_annotations(archive.data_dir / "cars_test_annos_withlabels.mat", [(1, 1, 9, 9, "00001.jpg")], no_class)
    with pytest.raises(DatasetError, match=r"lacks the field\(s\) \['class'\].*unlabelled cars_test_annos.mat"):
        load("cars", archive, cache)


def test_cars_unreadable_mat_file_and_empty_class_are_errors(tmp_path, cache):
    archive = make_cars_archive(tmp_path / "cars")
    write_cars_meta(archive.data_dir / "devkit" / "cars_meta.mat", (*archive.class_names, "Bugatti Veyron 2009"))
    with pytest.raises(DatasetError, match="1 of 4 classes have no images: Bugatti Veyron 2009"):
        load("cars", archive, cache)
    (archive.data_dir / "devkit" / "cars_meta.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(DatasetError, match=r"cars_meta.mat: cannot read MATLAB file"):
        load("cars", archive, cache)


def test_imagefolder_errors(tmp_path, cache):
    archive = make_imagefolder(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "wolf").mkdir()
    with pytest.raises(DatasetError, match=r"class folder '.*train/wolf' holds no images"):
        load("imagefolder", archive, cache)
    (tmp_path / "tree" / "train" / "wolf").rmdir()

    corrupt_image(tmp_path / "tree" / sorted(archive.test)[0])
    with pytest.raises(DatasetError, match=f"cannot be read: {sorted(archive.test)[0]}: cannot decode"):
        load("imagefolder", archive, cache)

    shutil.rmtree(tmp_path / "tree" / "test")
    with pytest.raises(DatasetError, match="has no test split"):
        load("imagefolder", archive, cache)


def test_imagefolder_with_test_only_class_is_an_error(tmp_path, cache):
    make_imagefolder(tmp_path / "tree")
    write_image(tmp_path / "tree" / "test" / "wolf" / "1.png", 3, 1)
    with pytest.raises(DatasetError, match="no training images: wolf"):
        load_image_dataset(tmp_path / "tree", cache_dir=cache)


def test_unknown_names_and_conflicting_arguments_are_explained(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown data set 'cubb'.*Did you mean 'cub'.*known: cub, cars, digits"):
        resolve_source("cubb")
    with pytest.raises(DatasetError, match="'imagefolder' needs data_dir"):
        resolve_source("imagefolder")
    with pytest.raises(DatasetError, match="'digits' is bundled with scikit-learn and takes no data_dir"):
        resolve_source("digits", tmp_path)
    with pytest.raises(DatasetError, match="got both the folder"):
        resolve_source(tmp_path, tmp_path / "other")
    assert issubclass(DatasetError, ValueError)


# ------------------------------------------------------------------------------------------------ transforms


def test_with_transforms_applies_train_and_eval_transforms_lazily_for_a_dataloader(tmp_path, cache):
    archive = make_imagefolder(tmp_path / "tree")
    write_image(tmp_path / "tree" / "test" / "cat" / "grey.png", 0, 0, mode="L")  # a greyscale image, as in CUB
    data, _ = load("imagefolder", archive, cache, val_fraction=0.2)
    train_transform = T.Compose([T.Resize(12), T.ToTensor()])
    eval_transform = T.Compose([T.Resize(8), T.ToTensor()])
    ready = with_transforms(data, train_transform, eval_transform)

    assert ready["train"][0]["image"].shape == (3, 12, 12)
    assert ready["validation"][0]["image"].shape == (3, 8, 8)
    grey = files(data["test"]).index("test/cat/grey.png")
    assert ready["test"][grey]["image"].shape == (3, 8, 8)  # converted to RGB before the transform
    assert set(ready["train"][0]) == {"image", "label"}
    assert isinstance(data["train"][0]["image"], Image.Image)  # the input DatasetDict is untouched

    loader = torch.utils.data.DataLoader(ready["train"], batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 12, 12) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == column(data["train"], "label")[:4]
    red = batch["image"][:, 0].mean(dim=(1, 2)) * 255  # the pixels that reach the model still match the label
    assert [round((r.item() - 40) / 60) for r in red] == batch["label"].tolist()


def test_with_transforms_accepts_timm_transforms_and_pickles_for_workers(tmp_path, cache):
    from timm.data import create_transform

    data, _ = load_image_dataset("digits", cache_dir=cache)
    ready = with_transforms(data, create_transform(16, is_training=True), create_transform(16))
    assert ready["train"][0]["image"].shape == ready["test"][0]["image"].shape == (3, 16, 16)
    restored = pickle.loads(pickle.dumps(ImageTransform(create_transform(16))))
    assert restored({"image": [data["test"][0]["image"]], "label": [3]})["image"][0].shape == (3, 16, 16)


def test_info_to_dict_is_json_serialisable():
    info = ImageDatasetInfo("cub", "local", "/data/CUB_200_2011", ["a", "b"], split_sizes={"train": 2})
    record = json.loads(json.dumps(info.to_dict()))
    assert record["num_classes"] == 2 and record["class_names"] == ["a", "b"] and record["skipped"] == []
