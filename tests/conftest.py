"""Shared test settings and fixtures."""

import datasets
import pytest
import torch
from fake_datasets import make_imagefolder

# One intra-op thread: the tests' tensors are small, and OpenMP's spinning threads slow to a crawl when the two cores
# are shared with anything else (a benchmark, the suite's own subprocesses).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 3-class imagefolder tree (12 train / 4 test images per class) under ``<base>/folder``; returns ``base``."""
    base = tmp_path_factory.mktemp("tiny")
    make_imagefolder(base / "folder", counts={"train": 12, "test": 4})
    return base


@pytest.fixture
def offline_hub(monkeypatch):
    """No test may reach a hub: the machine has no access, and a test that tried would hang on retries.

    ``datasets`` reads HF_HUB_OFFLINE once, at import, so its parsed flag is set as well as the variables.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if bars:
        datasets.enable_progress_bars()


@pytest.fixture
def restore_registries():
    """Snapshot timm-bninit's and timm's registries; the returned function (also run at teardown) puts them back.

    Restores in place: timm's functions read the module globals, and timm-bninit replaced the dicts with subclasses.
    """
    from timm.layers import create_norm as timm_norm
    from timm.layers import create_norm_act as timm_norm_act

    from timm_bninit import registry as bninit_registry

    containers = [bninit_registry._REGISTRY, timm_norm._NORM_MAP, timm_norm._NORM_TYPES, timm_norm_act._NORM_ACT_MAP,
                  timm_norm_act._NORM_ACT_TYPES, timm_norm_act._NORM_TO_NORM_ACT_MAP,
                  timm_norm_act._NORM_ACT_REQUIRES_ARG]
    saved = [container.copy() for container in containers]

    def restore():
        for container, copy in zip(containers, saved):
            container.clear()
            container.update(copy)

    yield restore
    restore()
