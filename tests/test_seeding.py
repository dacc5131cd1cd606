"""Seed streams and random-state scopes: what a scope seeds, what it restores, and that seed_globals draws alike."""

import random

import numpy as np
import torch

from timm_bninit.experiment.loaders import EpochShuffleSampler
from timm_bninit.experiment.seeding import rng_scope, seed_for, seed_globals


def draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(4), random.random(), float(np.random.rand())


def expected_draws(seed: int) -> tuple[torch.Tensor, float, float]:
    """The draws of freshly seeded private generators, the definition of 'seeded with seed'."""
    return (torch.rand(4, generator=torch.Generator().manual_seed(seed)), random.Random(seed).random(),
            float(np.random.RandomState(seed % 2**32).rand()))


def assert_same(got, want):
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and got[2] == want[2]


def test_rng_scope_seeds_all_three_generators_and_restores_them():
    seed = seed_for(7, "augment", 2, 11)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    outside = draws()  # what the outer streams give next, without any scope in between
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    with rng_scope(seed):
        assert_same(draws(), expected_draws(seed))
    assert_same(draws(), outside)


def test_seed_globals_draws_what_the_scope_draws_and_keeps_the_seeded_state():
    seed = seed_for(3, "augment", 0, 5)  # a 63-bit seed: numpy's is taken modulo 2**32, as in the scope
    assert seed >= 2**32
    with rng_scope(seed):
        inside = draws()
    torch.manual_seed(99)
    seed_globals(seed)
    after = draws()
    assert_same(after, inside)
    assert_same(after, expected_draws(seed))


def test_seed_streams_are_independent_and_stable():
    assert seed_for(1, "augment", 0, 5) == seed_for(1, "augment", 0, 5)
    assert len({seed_for(1, "augment", 0, 5), seed_for(1, "augment", 1, 5), seed_for(2, "augment", 0, 5),
                seed_for(1, "data-order", 0, 5)}) == 4
    orders = [list(EpochShuffleSampler(20, seed=3)) for _ in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(20))
    sampler = EpochShuffleSampler(20, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != orders[0]
