"""Seeded data loading: the epoch travels with each index, so augmentation is a pure function of (seed, epoch, index)
whether the workers are fresh, persistent or absent, and whichever pipeline (a PIL transform, or the uint8 ``fast`` and
``pil`` pipelines) decodes and augments."""

import os
import pickle
from dataclasses import replace

import pytest
import torch
from fake_datasets import make_imagefolder
from PIL import Image
from timm.data import create_transform

from timm_bninit.data import ImagePipeline, load_image_dataset, uint8_pipeline
from timm_bninit.experiment.loaders import (
    EpochIndex,
    EpochShuffleSampler,
    SeededImageDataset,
    build_loaders,
    decoded_images,
    stored_images,
    yield_cpu_to_training,
)
from timm_bninit.experiment.recipe import load_recipe
from timm_bninit.experiment.seeding import rng_scope, seed_for

SEED = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("loaders")
    make_imagefolder(base / "folder", counts={"train": 4, "test": 2})  # 12 train, 6 test images
    splits, _ = load_image_dataset("imagefolder", data_dir=base / "folder", cache_dir=base / "cache", val_fraction=0)
    return splits


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """The same tree as JPEGs, so the fast pipeline's own decoder (libjpeg-turbo) reads them in the workers."""
    base = tmp_path_factory.mktemp("jpeg")
    make_imagefolder(base / "folder", counts={"train": 4, "test": 2})
    for png in sorted((base / "folder").rglob("*.png")):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    splits, _ = load_image_dataset("imagefolder", data_dir=base / "folder", cache_dir=base / "cache", val_fraction=0)
    return splits


def augment():
    return create_transform(16, is_training=True)


def transform_of(kind: str):
    """timm's training transform (random-resized crop, flip, colour jitter) as a PIL callable or a uint8 pipeline."""
    return augment() if kind == "PIL callable" else uint8_pipeline(augment(), kind)


def sample(rows, index: int, transform) -> torch.Tensor:
    """Sample ``index`` by the definition: the stored image decoded and transformed by ``transform``."""
    if isinstance(transform, ImagePipeline):
        return transform(stored_images(rows)[index]["image"])
    return transform(rows[index]["image"].convert("RGB"))


def test_epoch_index_is_the_int_and_carries_its_epoch_to_a_worker():
    item = EpochIndex(3, epoch=2)
    assert item == 3 and hash(item) == hash(3) and [10, 20, 30, 40][item] == 40 and sorted([item, 1]) == [1, 3]
    assert str(item) == "3" and repr(item) == "EpochIndex(3, epoch=2)"
    copy = pickle.loads(pickle.dumps(item))  # DataLoader workers get their indices pickled
    assert isinstance(copy, EpochIndex) and copy == 3 and copy.epoch == 2


def test_sampler_yields_the_epoch_order_and_the_epoch():
    sampler = EpochShuffleSampler(12, seed=SEED)
    sampler.set_epoch(2)
    order = list(sampler)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(seed_for(SEED, "data-order", 2))).tolist()
    assert order == expected and all(isinstance(i, EpochIndex) and i.epoch == 2 for i in order)
    sampler.set_epoch(3)
    assert list(sampler) != order


def test_sample_i_of_epoch_e_is_drawn_from_its_own_stream(data):
    transform = augment()
    dataset = SeededImageDataset(data["train"], transform, seed=SEED)
    image = data["train"][5]["image"].convert("RGB")
    with rng_scope(seed_for(SEED, "augment", 2, 5)):
        expected = transform(image)
    assert torch.equal(dataset[EpochIndex(5, epoch=2)][0], expected)  # the index's epoch, not the attribute (0)
    dataset.epoch = 2
    assert torch.equal(dataset[5][0], expected)  # a plain index: the attribute's epoch
    assert not torch.equal(dataset[EpochIndex(5, epoch=1)][0], expected)


def test_main_process_access_leaves_the_global_random_state_alone(data):
    dataset = SeededImageDataset(data["train"], augment(), seed=SEED)
    torch.manual_seed(0)
    undisturbed = torch.rand(3)
    torch.manual_seed(0)
    dataset[EpochIndex(1, epoch=0)]
    assert torch.equal(torch.rand(3), undisturbed)


def epochs_of_batches(data, num_workers: int, kind: str = "PIL callable") -> tuple[bool, list[list[torch.Tensor]]]:
    config = replace(load_recipe("demo"), seed=SEED, batch_size=4, num_workers=num_workers, classes=None,
                     preload=False, augmentation="rrc")
    transform = transform_of(kind)
    loaders = build_loaders(config, data, transform, transform)
    epochs = []
    for epoch in range(2):
        loaders.train_sampler.set_epoch(epoch)  # the data set's epoch attribute stays 0: workers never read it
        epochs.append([images for images, _ in loaders.train])
    return loaders.train.persistent_workers, epochs


def expected_batches(data, epoch: int, kind: str = "PIL callable") -> list[torch.Tensor]:
    """Epoch ``epoch`` by the definition: its order from (seed, epoch), sample i drawn from (seed, epoch, i)."""
    transform = transform_of(kind)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(seed_for(SEED, "data-order", epoch))).tolist()
    samples = []
    for index in order:
        with rng_scope(seed_for(SEED, "augment", epoch, index)):
            samples.append(sample(data["train"], index, transform))
    return [torch.stack(samples[start:start + 4]) for start in range(0, 12, 4)]


@pytest.mark.parametrize("kind", ["PIL callable", "fast", "pil"])
def test_persistent_workers_augment_each_epoch_by_its_own_stream(data, jpeg_data, kind):
    data = data if kind == "PIL callable" else jpeg_data
    persistent, with_workers = epochs_of_batches(data, num_workers=2, kind=kind)
    _, in_process = epochs_of_batches(data, num_workers=0, kind=kind)
    assert persistent
    assert all(batch.dtype == (torch.float32 if kind == "PIL callable" else torch.uint8) for batch in in_process[0])
    for epoch in range(2):
        expected = expected_batches(data, epoch, kind)
        assert len(with_workers[epoch]) == len(in_process[epoch]) == 3
        assert all(torch.equal(a, b) for a, b in zip(with_workers[epoch], expected)), f"workers, epoch {epoch}"
        assert all(torch.equal(a, b) for a, b in zip(in_process[epoch], expected)), f"in process, epoch {epoch}"


@pytest.mark.parametrize("decode", ["fast", "pil"])
def test_preloading_keeps_the_pipelines_decoded_images_and_changes_no_sample(jpeg_data, decode):
    rows = jpeg_data["train"]
    kept = decoded_images(rows, decode)  # what preload keeps: uint8 tensors (fast) or RGB PIL images (pil)
    assert len(kept) == 12 and all(isinstance(image, torch.Tensor if decode == "fast" else Image.Image)
                                   for image in kept)
    still = uint8_pipeline(create_transform(16), decode)  # draws nothing: transformed once, kept as uint8
    lazy, preloaded = SeededImageDataset(rows, still, None), SeededImageDataset(rows, still, None, preload=True)
    assert preloaded.prepared is not None and all(image.dtype == torch.uint8 for image in preloaded.prepared)
    assert all(torch.equal(lazy[i][0], preloaded[i][0]) for i in range(12))
    moving = uint8_pipeline(augment(), decode)
    lazy, preloaded = SeededImageDataset(rows, moving, SEED), SeededImageDataset(rows, moving, SEED, preload=True)
    assert preloaded.prepared is None
    assert all(torch.equal(lazy[EpochIndex(i, 1)][0], preloaded[EpochIndex(i, 1)][0]) for i in range(12))


class _Priority(torch.utils.data.Dataset):
    """Each item: the scheduling policy of the process that served it."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return os.sched_getscheduler(0)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_workers_of_a_cpu_run_yield_to_the_training_process(data):
    config = replace(load_recipe("demo"), seed=SEED, batch_size=4, num_workers=2, classes=None, preload=False)
    loaders = build_loaders(config, data, augment(), augment())
    for loader in (loaders.train, loaders.test, loaders.calibration):
        assert loader.worker_init_fn is yield_cpu_to_training
    served = torch.utils.data.DataLoader(_Priority(), batch_size=1, num_workers=2,
                                         worker_init_fn=loaders.train.worker_init_fn)
    assert [int(item) for item in served] == [os.SCHED_IDLE] * 2
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training process itself keeps its priority
