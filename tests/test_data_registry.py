"""The data-set registry: a data set declared once, here from outside the package (a local Parquet stand-in of a hub
repository with an official validation split), loaded and trained on; the one-line errors for what an entry cannot
serve; ``build_training``'s sizes taken from the entry, with no data on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from fake_datasets import (
    STAND_IN_CLASSES,
    label_of,
    make_cub_archive,
    make_hub_repo,
    make_imagefolder,
    make_validation_hub_repo,
    stand_in_spec,
    tiny_config,
)

import timm_bninit as tb
from timm_bninit.data import (
    DatasetError,
    get_dataset,
    list_datasets,
    load_image_dataset,
    register_dataset,
    resolve_source,
)
from timm_bninit.data import registry as data_registry
from timm_bninit.data.registry import IMAGEFOLDER_LAYOUT, BuiltinSource, DatasetSpec, HubCopy
from timm_bninit.experiment import train as engine
from timm_bninit.experiment.recipe import RecipeError, check_config
from timm_bninit.experiment.train import run_finetune

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_NAMES = ["cub", "cars", "digits", "imagefolder", "cifar10", "cifar100"]

pytestmark = pytest.mark.usefixtures("offline_hub")  # conftest.py: no test may reach a hub


@pytest.fixture
def registry(monkeypatch):
    """The registry as the package left it; whatever a test registers is gone after it."""
    monkeypatch.setattr(data_registry, "_DATASETS", dict(data_registry._DATASETS))
    monkeypatch.setattr(data_registry, "_ALIASES", dict(data_registry._ALIASES))


@pytest.fixture
def shapes(tmp_path, registry):
    """A data set the package does not know, registered as a user's module would: a hub copy (a local stand-in of
    the repository) whose source ships train, validation and test."""
    repo = make_validation_hub_repo(tmp_path / "shapes_repo")
    return repo, register_dataset(stand_in_spec("shapes", repo, title="Shapes", aliases=("shapes-3",)))


def local_only(name: str = "mine", **changes) -> DatasetSpec:
    return DatasetSpec(name, **{"local": IMAGEFOLDER_LAYOUT, **changes})


def one_line(raised) -> str:
    message = str(raised.value)
    assert "\n" not in message and not isinstance(raised.value, KeyError), message
    return message


# ------------------------------------------------------------------------------------------------ a new data set


def test_a_registered_data_set_is_found_by_name_and_alias_after_the_package_ones(shapes):
    _, spec = shapes
    assert get_dataset("Shapes-3") is spec and get_dataset(" shapes ") is spec
    assert list_datasets() == [*PACKAGE_NAMES, "shapes"]
    assert spec.splits == ("train", "validation", "test") and spec.split_sizes == {"train": 24, "validation": 9,
                                                                                   "test": 9}
    assert resolve_source("SHAPES") == ("shapes", None)  # no data_dir: its hub copy


def test_its_official_validation_split_is_loaded_not_drawn_from_train(tmp_path, shapes):
    repo, _ = shapes
    calls, real = [], datasets.load_dataset
    datasets_load = lambda path, **kw: calls.append(kw) or real(path, **kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_dataset", datasets_load)
        data, info = load_image_dataset("shapes", cache_dir=tmp_path / "cache", val_fraction=0.25, split_seed=3)
    assert calls[0]["data_files"] == {split: f"data/{split}-*.parquet" for split in ("train", "validation", "test")}
    # 24 train rows, not 24 - ceil(0.25 * 24) = 18: nothing was drawn from train
    assert info.split_sizes == {"train": 24, "validation": 9, "test": 9}
    assert info.val_fraction is None and info.split_seed is None
    assert info.origin == "hub" and info.source == str(repo.folder) and info.class_names == list(STAND_IN_CLASSES)
    for split in ("train", "validation", "test"):
        assert list(data[split]["label"]) == repo.labels[split]
        assert [label_of(row["image"]) for row in data[split]] == repo.labels[split]


def test_the_validation_split_is_checked_like_train_and_test(tmp_path, registry):
    # class 2's validation rows relabelled as class 0: sizes right, a class never seen in validation
    repo = make_validation_hub_repo(tmp_path / "broken", label_of_row=lambda split, row, label: (
        0 if split == "validation" and label == 2 else label))
    register_dataset(stand_in_spec("broken", repo))
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("broken", cache_dir=tmp_path / "cache")
    assert one_line(raised).endswith(
        "split 'validation' has no image of 1 of its 3 classes (labels 2; found 2 distinct labels), expected every "
        "class in train, validation and test: its label column is broken; pass another hub_revision"
    )

    short = make_validation_hub_repo(tmp_path / "short")
    register_dataset(stand_in_spec("short", short, split_sizes={"train": 24, "validation": 10, "test": 9}))
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("short", cache_dir=tmp_path / "cache")
    assert one_line(raised) == (
        f"hub copy {str(short.folder)!r} has 24 train / 9 validation / 9 test rows, expected the official "
        "24 train / 10 validation / 9 test; pass another hub_revision"
    )


def test_a_declared_validation_split_the_copy_lacks_is_named(tmp_path, registry):
    # no data_files: the repository's own splits are read, and the declared validation split is not among them
    repo = make_hub_repo(tmp_path / "two_splits", STAND_IN_CLASSES, {"train": 1, "test": 1})
    register_dataset(DatasetSpec("two", split_sizes={"train": 12, "validation": 3, "test": 9},
                                 hub=HubCopy(str(repo.folder), None)))
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("two", cache_dir=tmp_path / "cache")
    assert one_line(raised) == f"hub copy {str(repo.folder)!r} has no validation split (found ['test', 'train'])"


def test_the_engine_trains_on_it_and_build_training_reads_its_sizes_without_the_data(tmp_path, shapes):
    config = tiny_config(tmp_path, tmp_path, dataset="shapes", data_dir=None, epochs=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "load_image_dataset", _never)
        training = tb.build_training(config)
    assert training.updates_per_epoch == 24 // 6 and training.model.get_classifier().out_features == 3
    final = run_finetune(config, tmp_path / "run", quiet=True, data_cache_dir=tmp_path / "cache")
    assert final["data"]["name"] == "shapes" and final["data"]["origin"] == "hub"
    assert final["data"]["split_sizes"] == {"train": 24, "validation": 9, "test": 9}
    assert final["data"]["num_classes"] == 3
    assert final["data"]["val_fraction"] is None and final["selection"] == "validation"
    assert final["num_updates"] == training.updates_per_epoch  # what build_training said, without the data
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and 0 <= metrics[0]["val_acc"] <= 1


def _never(*args, **kwargs):
    raise AssertionError("the data were loaded")


# ------------------------------------------------------------------------------------------------ what an entry serves


def test_a_hub_only_entry_given_a_data_dir_is_refused(tmp_path, shapes):
    repo, _ = shapes
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("shapes", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert one_line(raised) == (
        f"'shapes' is read from its hub copy {str(repo.folder)!r} only and has no local layout, so it takes no "
        f"data_dir (got {str(tmp_path)!r}); drop data_dir, or register the entry with a local layout"
    )
    with pytest.raises(RecipeError) as raised:  # the recipe refuses it before any work, in the same words
        check_config(tiny_config(tmp_path, tmp_path, dataset="shapes", data_dir=str(tmp_path)))
    assert one_line(raised).startswith("recipe key 'dataset'/'data_dir': 'shapes' is read from its hub copy")


def test_a_builtin_given_a_data_dir_is_refused(tmp_path):
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("digits", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert one_line(raised) == f"'digits' is bundled with scikit-learn and takes no data_dir (got {str(tmp_path)!r})"


def test_an_entry_without_a_hub_copy_needs_a_data_dir(tmp_path, registry):
    register_dataset(local_only())
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("mine", cache_dir=tmp_path / "cache")
    assert one_line(raised) == "'mine' needs data_dir=<folder with train/<class>/... and test/<class>/...>"
    archive = make_imagefolder(tmp_path / "tree")
    data, info = load_image_dataset("mine", data_dir=archive.data_dir, cache_dir=tmp_path / "cache", val_fraction=0)
    assert info.name == "mine" and info.origin == "local" and sorted(data["test"]["file"]) == sorted(archive.test)
    assert Path(info.cache_path).name.startswith("mine-")  # the entry's name keys the cache


def test_hub_revision_for_a_local_read_is_refused(tmp_path, shapes):
    register_dataset(local_only())
    archive = make_imagefolder(tmp_path / "tree")
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("mine", data_dir=archive.data_dir, cache_dir=tmp_path / "cache", hub_revision="abc")
    assert one_line(raised).startswith(f"hub_revision='abc' selects a hub copy's commit, but the data come from the "
                                       f"local folder {str(archive.data_dir)!r}")
    config = tiny_config(tmp_path, tmp_path, dataset="mine", data_dir=str(archive.data_dir), hub_revision="abc")
    with pytest.raises(RecipeError) as raised:
        check_config(config)
    # the hub copies the recipe names are the registry's, the new one included
    assert one_line(raised).startswith("recipe key 'hub_revision' selects a commit of a hub copy (cub, cars, cifar10, "
                                       "cifar100, shapes), but 'mine' is read from a local folder")
    check_config(tiny_config(tmp_path, tmp_path, dataset="shapes", data_dir=None, hub_revision="abc"))


def test_an_unknown_name_suggests_close_ones_and_lists_the_known(shapes):
    with pytest.raises(DatasetError) as raised:
        get_dataset("shapez")
    known = ", ".join([*PACKAGE_NAMES, "shapes"])
    assert one_line(raised) == (f"unknown data set 'shapez'. Did you mean 'shapes', 'shapes-3'?; known: {known}; "
                                "register it with timm_bninit.data.register_dataset")
    with pytest.raises(DatasetError, match=r"unknown data set 'shapez' \(and no such folder\)\. Did you mean 'shapes'"):
        resolve_source("shapez")


def test_a_folder_holding_another_data_set_says_which(tmp_path):
    make_cub_archive(tmp_path / "birds")
    with pytest.raises(DatasetError) as raised:
        load_image_dataset("cifar10", data_dir=tmp_path / "birds", cache_dir=tmp_path / "cache")
    assert one_line(raised).endswith("; it holds CUB-200-2011 instead: did you mean 'cub'?")


def test_a_registered_layout_is_recognised_in_a_bare_folder(tmp_path, registry):
    marked = replace(IMAGEFOLDER_LAYOUT, hint="a tree with SHAPES.txt",
                     recognise=lambda folder: (folder / "SHAPES.txt").is_file())
    register_dataset(local_only(local=marked))
    make_imagefolder(tmp_path / "tree")
    assert resolve_source(tmp_path / "tree") == ("imagefolder", tmp_path / "tree")
    (tmp_path / "tree" / "SHAPES.txt").write_text("a marker")
    assert resolve_source(tmp_path / "tree") == ("mine", tmp_path / "tree")


# ------------------------------------------------------------------------------------------------ declaring


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "Mine", "local": IMAGEFOLDER_LAYOUT}, "data set name or alias 'Mine' must be non-empty, lower case"),
    ({"name": "mine"}, "data set 'mine' has neither a hub copy nor a local source"),
    ({"name": "mine", "split_sizes": {"train": 5}, "local": IMAGEFOLDER_LAYOUT},
     r"split_sizes must name the splits train and test, and validation where the source has one; got \['train'\]"),
    ({"name": "mine", "split_sizes": {"train": 5, "val": 2, "test": 2}, "local": IMAGEFOLDER_LAYOUT},
     r"got \['test', 'train', 'val'\]"),
    ({"name": "mine", "split_sizes": {"train": 5, "test": 0}, "local": IMAGEFOLDER_LAYOUT}, "needs ≥ 1 row"),
    ({"name": "mine", "num_classes": 1, "local": IMAGEFOLDER_LAYOUT}, "num_classes must be ≥ 2, got 1"),
    ({"name": "mine", "split_sizes": {"train": 5, "validation": 2, "test": 2},
      "hub": HubCopy("owner/mine", None, data_files={"train": "a", "test": "b"})},
     r"hub.data_files names the splits \['test', 'train'\], but split_sizes lists \['test', 'train', 'validation'\]"),
    ({"name": "mine", "hub": HubCopy("owner/mine", None),
      "local": BuiltinSource("package.load", dict, dict, "bundled with a package")}, "takes no hub copy"),
])
def test_a_malformed_entry_is_refused_when_declared(fields, message):
    with pytest.raises(DatasetError, match=message) as raised:
        DatasetSpec(**fields)
    one_line(raised)


def test_registering_a_name_again_warns_and_replaces_it_with_its_aliases(registry):
    register_dataset(local_only(aliases=("my",)))
    with pytest.warns(UserWarning, match="data set 'mine' overwrites its earlier registration"):
        second = register_dataset(local_only(aliases=("ours",)))
    assert get_dataset("mine") is second and get_dataset("ours") is second
    assert data_registry.find_dataset("my") is None  # the old entry's alias went with it
    with pytest.raises(DatasetError, match="alias 'cub' of data set 'birds' is the name of the registered data set"):
        register_dataset(local_only("birds", aliases=("cub",)))
    assert data_registry.find_dataset("birds") is None  # refused before anything changed
    with pytest.warns(UserWarning, match="alias 'cub200' of data set 'birds' overwrites its use for 'cub'"):
        register_dataset(local_only("birds", aliases=("cub200",)))
    assert get_dataset("cub200").name == "birds" and get_dataset("cub").name == "cub"


def test_importing_the_data_layer_imports_neither_datasets_nor_the_engine():
    # the configuration layer imports the registry: it must stay cheap
    code = ("import sys, timm_bninit.data.registry; "
            "print(sorted(m for m in ('datasets', 'sklearn', 'scipy', 'timm_bninit.experiment') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ build_training


@pytest.mark.parametrize(("recipe", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_build_training_needs_no_data_when_the_entry_declares_the_sizes(recipe, classes, tmp_path, monkeypatch):
    monkeypatch.setenv("TIMM_BNINIT_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "load_dataset", _never)
    monkeypatch.setattr(engine, "load_image_dataset", _never)
    training = tb.build_training(recipe)
    # 50,000 official training images less the 10% validation draw, ceil(0.1 * 50,000) = 5,000: 45,000 images,
    # batch 128, the last partial batch dropped
    assert training.config.batch_size == 128 and training.config.val_fraction == 0.1
    assert training.updates_per_epoch == 45_000 // 128 == 351
    assert training.model.get_classifier().out_features == classes
    # a quarter drawn instead: 50,000 - 12,500 = 37,500 images
    assert tb.build_training(recipe, val_fraction=0.25).updates_per_epoch == 37_500 // 128 == 292
    assert not (tmp_path / "cache").exists()


def test_the_declared_train_size_is_the_one_the_validation_draw_leaves(tmp_path):
    # digits: 1,437 official training images; the draw takes ceil(f * 1,437) of them (1,437 * 0.1 = 143.7 -> 144,
    # 1,437 * 0.25 = 359.25 -> 360)
    digits = get_dataset("digits")
    for fraction, expected in ((0.1, 1293), (0.25, 1077), (0.0, 1437)):
        data, _ = load_image_dataset("digits", cache_dir=tmp_path / "cache", val_fraction=fraction)
        assert digits.train_size(fraction) == len(data["train"]) == expected, fraction


def test_build_training_still_reads_the_data_for_a_subset_or_a_folder(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setenv("TIMM_BNINIT_DATA_CACHE", str(tmp_path / "cache"))
    loads, real = [], engine.load_image_dataset
    monkeypatch.setattr(engine, "load_image_dataset", lambda *a, **kw: loads.append(a[0]) or real(*a, **kw))
    assert tb.build_training("demo", model="test_resnet").updates_per_epoch == 1293 // 64 and loads == []
    # a class subset: only the data can say how many of the 1,293 images are of classes 0, 1 and 2
    subset = tb.build_training("demo", model="test_resnet", classes="[0, 1, 2]")
    assert loads == ["digits"] and subset.model.get_classifier().out_features == 3
    assert subset.updates_per_epoch == _kept_images(tmp_path, [0, 1, 2]) // 64
    folder = tb.build_training("demo", model="test_resnet", dataset="imagefolder", data_dir=str(tiny_data / "folder"),
                               val_fraction=0.25, batch_size=6)
    assert loads == ["digits", "imagefolder"] and folder.updates_per_epoch == 27 // 6


def _kept_images(cache: Path, classes: list[int]) -> int:
    data, _ = load_image_dataset("digits", cache_dir=cache / "cache", val_fraction=0.1)
    return sum(label in classes for label in data["train"]["label"])
