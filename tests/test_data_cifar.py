"""CIFAR-10 / CIFAR-100: the official python archives (layout, labels, pixel planes, splits, cache, errors) and the hub
copies (column renames, the unreachable-hub error). Every archive is a tiny fake written in tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from fake_cifar import make_cifar10_archive, make_cifar100_archive, pattern, read_batch, to_row, write_batch
from PIL import Image
from torchvision import transforms as T

from timm_bninit.data import DatasetError, load_image_dataset, resolve_source, with_transforms
from timm_bninit.data import cifar as data_cifar

pytestmark = pytest.mark.usefixtures("offline_hub")  # conftest.py: no test may reach a hub


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def column(split, name: str) -> list:
    return list(split[name])


def assert_rows_match(split, archive, coarse: bool = False) -> None:
    """Each row's labels are the archive's for its ``<batch>/<row>``, and its pixels are that row's, exactly."""
    for row in split:
        label, superclass, image = archive.rows[row["file"]]
        assert row["label"] == label, row["file"]
        if coarse:
            assert row["coarse_label"] == superclass, row["file"]
        assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
        np.testing.assert_array_equal(np.asarray(row["image"]), image, err_msg=row["file"])


# ------------------------------------------------------------------------------------------------ local archives


@pytest.mark.parametrize("point_at", ["parent", "archive_folder"])
def test_cifar10_archive_loads_official_splits_labels_names_and_pixels(tmp_path, cache, point_at):
    archive = make_cifar10_archive(tmp_path / "data", num_classes=3, num_train=4, num_test=2)
    data_dir = archive.data_dir if point_at == "parent" else archive.root
    data, info = load_image_dataset("cifar10", data_dir=data_dir, cache_dir=cache, val_fraction=0.25)

    assert list(data) == ["train", "validation", "test"]
    assert isinstance(data["train"].features["image"], datasets.Image)
    assert data["train"].features["label"] == datasets.ClassLabel(names=["class0", "class1", "class2"])
    assert data["train"].column_names == ["image", "label", "file"]
    train_files = column(data["train"], "file") + column(data["validation"], "file")
    assert sorted(train_files) == sorted(archive.train)  # all five data batches, nothing from test_batch
    assert column(data["test"], "file") == sorted(archive.test)  # official order kept
    for split in data.values():
        assert_rows_match(split, archive)
    assert info.name == "cifar10" and info.origin == "local" and info.source == str(archive.root.resolve())
    assert info.class_names == ["class0", "class1", "class2"] and info.num_classes == 3
    assert info.split_sizes == {"train": 9, "validation": 3, "test": 6}
    assert info.val_fraction == 0.25 and info.split_seed == 0
    assert not info.has_bbox and info.skipped == []


def test_cifar100_archive_loads_fine_labels_as_label_and_keeps_coarse_labels(tmp_path, cache):
    archive = make_cifar100_archive(tmp_path / "data", num_classes=4, num_coarse=2, num_train=5, num_test=2)
    data, info = load_image_dataset("cifar100", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0.2)

    assert data["train"].column_names == ["image", "label", "coarse_label", "file"]
    assert data["test"].features["label"].names == ["fine0", "fine1", "fine2", "fine3"]
    assert data["test"].features["coarse_label"].names == ["coarse0", "coarse1"]
    assert info.name == "cifar100" and info.class_names == archive.class_names
    assert info.split_sizes == {"train": 16, "validation": 4, "test": 8}
    assert sorted(column(data["train"], "file") + column(data["validation"], "file")) == sorted(archive.train)
    for split in data.values():
        assert_rows_match(split, archive, coarse=True)


def test_pixel_planes_go_to_the_right_channels_and_rows(tmp_path, cache):
    # written independently of the loader: red plane first, then green, then blue, each row-major
    archive = make_cifar10_archive(tmp_path / "data", num_classes=2, num_train=2, num_test=2)
    data, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    file = column(data["test"], "file")[3]
    pixels = np.asarray(data["test"][3]["image"])
    number = int(archive.test[file][2][0, 0, 2])
    assert tuple(pixels[0, 31]) == (248, 0, number)  # top right: red grows along x (the columns)
    assert tuple(pixels[31, 0]) == (0, 248, number)  # bottom left: green grows along y (the rows)
    assert tuple(pixels[5, 9]) == (72, 40, number)
    raw = read_batch(archive.root / "test_batch")["data"][3]
    assert (raw[:1024].reshape(32, 32) == pixels[..., 0]).all() and (raw[2048:] == number).all()


def test_pixels_reach_the_model_in_the_right_channels_through_with_transforms(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data", num_classes=2, num_train=3, num_test=2)
    data, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    ready = with_transforms(data, T.ToTensor())
    batch = next(iter(torch.utils.data.DataLoader(ready["test"], batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32)
    files = column(data["test"], "file")[:4]
    expected = torch.stack([torch.from_numpy(archive.test[file][2]).permute(2, 0, 1) for file in files])
    assert torch.equal((batch["image"] * 255).round().to(torch.uint8), expected)
    assert batch["label"].tolist() == column(data["test"], "label")[:4]


def test_python3_pickles_with_str_keys_and_protocol_5_load_too(tmp_path, cache):
    # copies re-saved by Python 3 (str keys, numpy's protocol-5 reduction) rather than the Python 2 originals
    archive = make_cifar10_archive(tmp_path / "data", protocol=5, str_keys=True)
    data, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    assert_rows_match(data["test"], archive)


def test_non_uint8_integer_pixels_in_range_are_accepted(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data")
    batch = read_batch(archive.root / "test_batch")
    write_batch(archive.root / "test_batch", batch | {"data": batch["data"].astype(np.int64)})
    data, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    assert_rows_match(data["test"], archive)


def test_layout_is_detected_from_a_bare_path(tmp_path, cache):
    cifar10 = make_cifar10_archive(tmp_path / "c10")
    cifar100 = make_cifar100_archive(tmp_path / "c100")
    assert resolve_source(tmp_path / "c10") == ("cifar10", tmp_path / "c10")
    assert resolve_source(cifar10.root) == ("cifar10", cifar10.root)
    assert resolve_source(tmp_path / "c100") == ("cifar100", tmp_path / "c100")
    assert resolve_source(cifar100.root) == ("cifar100", cifar100.root)
    assert resolve_source("CIFAR-10", tmp_path / "c10") == ("cifar10", tmp_path / "c10")
    assert resolve_source("cifar_100") == ("cifar100", None)  # no folder: the hub copy
    data, info = load_image_dataset(str(tmp_path / "c100"), cache_dir=cache, val_fraction=0)
    assert info.name == "cifar100" and column(data["test"], "file") == sorted(cifar100.test)


def test_an_imagefolder_tree_is_not_taken_for_cifar100(tmp_path):
    # CIFAR-100's file names are generic: a tree with a train/ folder and a meta file stays an imagefolder
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "meta").write_text("notes")
    assert resolve_source(tmp_path / "tree")[0] == "imagefolder"


def test_validation_split_is_stratified_and_fixed_by_the_split_seed(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data", num_classes=5, num_train=8, num_test=1)
    first, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0.25)
    torch.manual_seed(123)
    np.random.seed(123)
    second, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0.25)
    other, _ = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0.25,
                                  split_seed=1)
    assert Counter(first["validation"]["label"]) == dict.fromkeys(range(5), 2)
    assert column(first["validation"], "file") == column(second["validation"], "file")
    assert column(other["validation"], "file") != column(first["validation"], "file")
    assert not set(column(first["train"], "file")) & set(column(first["validation"], "file"))


# ------------------------------------------------------------------------------------------------ cache


def test_second_load_comes_from_the_cache_without_unpickling(tmp_path, cache, monkeypatch):
    archive = make_cifar10_archive(tmp_path / "data")
    first, info1 = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0.25)

    def fail(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(data_cifar, "build_cifar_dataset", fail)
    monkeypatch.setattr(data_cifar, "_load_batch", fail)
    # the same root, named by another path
    second, info2 = load_image_dataset("cifar10", data_dir=archive.root, cache_dir=cache, val_fraction=0.25)
    assert (info1.from_cache, info2.from_cache) == (False, True) and info1.cache_path == info2.cache_path
    assert Path(info2.cache_path).name.startswith("cifar10-")
    assert column(second["test"], "file") == column(first["test"], "file")
    build = json.loads((Path(info2.cache_path) / "build.json").read_text())
    assert build["source"] == str(archive.root.resolve()) and build["class_names"] == archive.class_names
    shutil.rmtree(archive.root)  # the image bytes live in the cache entry
    assert_rows_match(second["test"], archive)


def test_a_replaced_batch_file_rebuilds_and_replaces_the_old_entry(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data")
    _, before = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    batch = read_batch(archive.root / "test_batch")
    batch["data"][0] = to_row(pattern(200))
    stat = (archive.root / "test_batch").stat()
    write_batch(archive.root / "test_batch", batch)
    os.utime(archive.root / "test_batch", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: bytes decide
    data, after = load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache, val_fraction=0)
    assert not after.from_cache and after.cache_path != before.cache_path
    assert [p.name for p in cache.iterdir()] == [Path(after.cache_path).name]  # stale entry pruned
    assert np.asarray(data["test"][0]["image"])[0, 0, 2] == 200


# ------------------------------------------------------------------------------------------------ bad archives


def test_missing_folder_and_data_dir_are_explained(tmp_path, cache):
    with pytest.raises(DatasetError, match="CIFAR-10 data dir .*nowhere' does not exist"):
        load_image_dataset("cifar10", data_dir=tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no CIFAR-10 archive in .*empty': expected cifar-10-batches-py/ \(with "
                                           r"batches.meta, data_batch_1, .*test_batch\)"):
        load_image_dataset("cifar10", data_dir=tmp_path / "empty", cache_dir=cache)
    (tmp_path / "empty" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz is there but not extracted: run `tar xzf"):
        load_image_dataset("cifar10", data_dir=tmp_path / "empty", cache_dir=cache)


def test_the_other_cifar_in_data_dir_is_pointed_out(tmp_path, cache):
    make_cifar100_archive(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"no CIFAR-10 archive .*holds CIFAR-100 instead: did you mean 'cifar100'"):
        load_image_dataset("cifar10", data_dir=tmp_path / "data", cache_dir=cache)


@pytest.mark.parametrize("missing", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar10_missing_batch_file_is_named(tmp_path, cache, missing):
    archive = make_cifar10_archive(tmp_path / "data")
    (archive.root / missing).unlink()
    with pytest.raises(DatasetError, match=rf"CIFAR-10 archive .* is missing the file\(s\) '{missing}' .*re-extract "
                                           r"cifar-10-python.tar.gz"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached from a failed load


def test_an_empty_archive_folder_lists_every_missing_file(tmp_path, cache):
    (tmp_path / "data" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"CIFAR-100 archive .* is missing the file\(s\) 'meta', 'train', 'test'"):
        load_image_dataset("cifar100", data_dir=tmp_path / "data", cache_dir=cache)


@pytest.mark.parametrize("missing", ["train", "meta"])
def test_cifar100_missing_file_is_named(tmp_path, cache, missing):
    archive = make_cifar100_archive(tmp_path / "data")
    (archive.root / missing).unlink()
    with pytest.raises(DatasetError, match=rf"CIFAR-100 archive .* is missing the file\(s\) '{missing}'"):
        load_image_dataset("cifar100", data_dir=archive.data_dir, cache_dir=cache)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((3, 3000), np.uint8), r"'data' has shape \(3, 3000\); expected \(N, 3072\)"),
        (np.zeros((3, 3, 32, 32), np.uint8), r"'data' has shape \(3, 3, 32, 32\); expected \(N, 3072\)"),
        (np.zeros(3072, np.uint8), r"'data' has shape \(3072,\); expected \(N, 3072\)"),
        (np.full((3, 3072), 256, np.int64), r"'data' holds int64 values in 256\.\.256; expected uint8 .* 0\.\.255"),
        (np.zeros((3, 3072), np.float32), r"'data' holds float32 values; expected uint8"),
    ],
)
def test_wrong_pixel_arrays_are_named(tmp_path, cache, data, message):
    archive = make_cifar10_archive(tmp_path / "data")
    batch = read_batch(archive.root / "data_batch_2")
    write_batch(archive.root / "data_batch_2", batch | {"data": data, "labels": [0, 1, 2]})
    with pytest.raises(DatasetError, match=r"data_batch_2: " + message):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


@pytest.mark.parametrize(("labels", "message"), [
    ([0, 1, 3], r"1 label\(s\) in 'labels' outside 0\.\.2 \(batches.meta lists 3 class names\), first 3 at row 2"),
    ([-1, 1, 2], r"1 label\(s\) in 'labels' outside 0\.\.2 .*first -1 at row 0"),
    ([0, 1], r"'labels' holds 2 label\(s\) for 3 image\(s\) in 'data'; expected one per image"),
    (["a", "b", "c"], r"'labels' holds <U1 values; expected integer class indices"),
])
def test_bad_labels_are_named(tmp_path, cache, labels, message):
    archive = make_cifar10_archive(tmp_path / "data")
    batch = read_batch(archive.root / "data_batch_1")
    assert len(batch["labels"]) == 3
    write_batch(archive.root / "data_batch_1", batch | {"labels": labels})
    with pytest.raises(DatasetError, match=r"data_batch_1: " + message):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


def test_cifar100_coarse_label_outside_its_range_is_named(tmp_path, cache):
    archive = make_cifar100_archive(tmp_path / "data", num_coarse=2)
    batch = read_batch(archive.root / "test")
    batch["coarse_labels"][4] = 2
    write_batch(archive.root / "test", batch)
    with pytest.raises(DatasetError, match=r"test: 1 label\(s\) in 'coarse_labels' outside 0\.\.1 .*first 2 at row 4"):
        load_image_dataset("cifar100", data_dir=archive.data_dir, cache_dir=cache)


def test_missing_entries_and_bad_meta_are_named(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data")
    batch = read_batch(archive.root / "data_batch_4")
    write_batch(archive.root / "data_batch_4", {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(DatasetError, match=r"data_batch_4: no 'labels' entry \(has 'batch_label', 'data', 'filenames'"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)
    write_batch(archive.root / "data_batch_4", batch)

    meta = read_batch(archive.root / "batches.meta")
    write_batch(archive.root / "batches.meta", meta | {"label_names": [b"cat", b"dog", b"cat"]})
    with pytest.raises(DatasetError, match=r"batches.meta: 'label_names' lists the class name\(s\) \['cat'\] more"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)
    write_batch(archive.root / "batches.meta", meta | {"label_names": []})
    with pytest.raises(DatasetError, match=r"batches.meta: 'label_names' should be a non-empty list of class names"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)
    (archive.root / "batches.meta").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match=r"batches.meta: holds a list, expected a dict"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_batch_file_is_named(tmp_path, cache, damage):
    archive = make_cifar10_archive(tmp_path / "data")
    path = archive.root / "data_batch_5"
    content = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a pickle" * 8, "truncated": content[: len(content) // 2],
                      "empty": b""}[damage])
    with pytest.raises(DatasetError, match=r"data_batch_5: cannot read it as a CIFAR python batch file \(.*re-extract"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_that_would_run_code_is_refused(tmp_path, cache):
    # a harmless call stands in for an attack: any global beyond numpy's array rebuilders is refused, not resolved
    archive = make_cifar10_archive(tmp_path / "data")
    batch = read_batch(archive.root / "test_batch")
    write_batch(archive.root / "test_batch", batch | {"batch_label": _Payload()})
    with pytest.raises(DatasetError, match=r"test_batch: refused to unpickle (posix|nt)\.getcwd: a CIFAR batch file"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


def test_class_without_training_images_is_an_error(tmp_path, cache):
    archive = make_cifar10_archive(tmp_path / "data", num_classes=3)
    meta = read_batch(archive.root / "batches.meta")
    write_batch(archive.root / "batches.meta", meta | {"label_names": [*meta["label_names"], b"ghost"]})
    with pytest.raises(DatasetError, match=r"CIFAR-10 archive .*: 1 of 4 classes have no images: ghost"):
        load_image_dataset("cifar10", data_dir=archive.data_dir, cache_dir=cache)


# ------------------------------------------------------------------------------------------------ hub copies


@pytest.mark.parametrize(("name", "repo", "hint"), [
    ("cifar10", "uoft-cs/cifar10", "cifar-10-batches-py/"),
    ("cifar100", "uoft-cs/cifar100", "cifar-100-python/"),
])
def test_hub_unreachable_without_local_dir_says_to_pass_a_data_dir(tmp_path, name, repo, hint):
    # the real datasets.load_dataset runs, in offline mode (the offline_hub fixture); nothing is mocked
    with pytest.raises(DatasetError, match=f"could not load '{name}' from its Hugging Face hub copy '{repo}'") as err:
        load_image_dataset(name, cache_dir=tmp_path / "cache")
    assert f"data_dir=<the folder containing {hint}" in str(err.value)
    assert isinstance(err.value.__cause__, Exception)  # the hub's own error is kept as the cause


def fake_hub_copy(label_columns: dict[str, list[str]], rows: int = 12) -> datasets.DatasetDict:
    """A miniature uoft-cs copy: ``img`` plus the given ClassLabel columns (name -> class names)."""
    features = datasets.Features({"img": datasets.Image(), **{
        name: datasets.ClassLabel(names=names) for name, names in label_columns.items()}})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({
            "img": [Image.fromarray(pattern(i)) for i in range(rows)],
            **{name: [i % len(names) for i in range(rows)] for name, names in label_columns.items()},
        }, features=features)
        for split in ("train", "test")
    })


def test_hub_cifar10_img_column_becomes_image(tmp_path, monkeypatch):
    fake = fake_hub_copy({"label": ["airplane", "automobile", "bird"]})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: calls.append(repo) or fake)
    data, info = load_image_dataset("cifar10", cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert calls == ["uoft-cs/cifar10"]
    assert data["train"].column_names == ["image", "label"]
    assert info.origin == "hub" and info.source == "uoft-cs/cifar10"
    assert info.class_names == ["airplane", "automobile", "bird"]
    assert info.split_sizes == {"train": 9, "validation": 3, "test": 12}
    np.testing.assert_array_equal(np.asarray(data["test"][5]["image"]), pattern(5))


def test_hub_cifar100_fine_label_becomes_label_and_coarse_label_is_kept(tmp_path, monkeypatch):
    fake = fake_hub_copy({"fine_label": ["apple", "aquarium_fish", "baby"], "coarse_label": ["fruit", "fish"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: fake)
    data, info = load_image_dataset("cifar100", cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert data["train"].column_names == ["image", "label", "coarse_label"]
    assert info.class_names == ["apple", "aquarium_fish", "baby"] and info.source == "uoft-cs/cifar100"
    assert column(data["test"], "label") == [i % 3 for i in range(12)]
    assert column(data["test"], "coarse_label") == [i % 2 for i in range(12)]
