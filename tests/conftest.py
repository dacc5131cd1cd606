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
