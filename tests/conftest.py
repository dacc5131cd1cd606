"""Shared test settings and fixtures."""

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
