"""Seed streams: one named, hashed stream per source of randomness, so that within a seed only the method differs.

Two runs with the same seed that differ only in the method see the same shared-weight initialisation, the same data
order and the same augmentation draws: the pairing a paired t-test needs (docs/methods.md §6).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["seed_for", "rng_scope", "seed_globals"]


def seed_for(seed: int, stream: str, *parts: int) -> int:
    """A seed for one named random stream of a run, independent of every other stream.

    Derived by hashing, so adding a stream (or a method consuming more random numbers in one) never shifts another.
    """
    text = ":".join([str(seed), stream, *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def seed_globals(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and numpy's global generator, without keeping their previous states.

    What :func:`rng_scope` does on entry, for a process whose global random state has no other user, such as a
    DataLoader worker serving a seeded data set. Draws after it are exactly those inside ``rng_scope(seed)``.
    """
    # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding (recording a stack trace,
    # ~0.5 ms per sample) and, inside rng_scope, leak that seed out of the block
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy for the block, then restore their previous states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the CPU generator only, the one seed_globals seeds
        seed_globals(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
