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


class StoppedRun(Exception):
    """Raised by :func:`stop_after` where a kill would have stopped a run."""


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(n)``: runs in this process then stop (raising StoppedRun) before training epoch n + 1, as a kill
    once epoch n's checkpoint is written would; ``stop_after(None)`` lets them run to the end again.

    In-process, a stopped run lets go of its run directory as a killed process's kernel would (tests/test_lock.py
    kills real processes).
    """
    from timm_bninit.experiment import train

    train_one_epoch = train.train_one_epoch

    def stop(epochs):
        def maybe_stop(run, epoch, *args, **kwargs):
            if epochs is not None and epoch >= epochs:
                raise StoppedRun(f"stopped after epoch {epochs}")
            return train_one_epoch(run, epoch, *args, **kwargs)

        monkeypatch.setattr(train, "train_one_epoch", maybe_stop)

    return stop
