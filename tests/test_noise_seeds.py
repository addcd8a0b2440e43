"""Diffusion noise never repeats inside a run: every (step, global micro-batch) gets its own generator
seed, at the scale the paper-size runs reach (8,192 data-parallel ranks x 16 micro-batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.objective import noise_generator, noise_seed

RANKS, MICRO, STEPS = 8192, 16, 1000
M = RANKS * MICRO  # micro-batches per step over all ranks


def old_seed(seed: int, step: int, micro: int) -> int:
    """The formula this replaced: it collides once ranks x micro-batches reach 1009."""
    return (seed * 1_000_003 + step) * 1009 + micro


def test_the_old_collision_is_gone():
    # Global micro-batch 1009 at step 3 drew what micro-batch 0 drew at step 4.
    assert old_seed(7, 3, 1009) == old_seed(7, 4, 0)
    assert noise_seed(7, 3, 1009, M) != noise_seed(7, 4, 0, M)
    a = torch.randn(64, generator=noise_generator(torch.device("cpu"), 7, 3, 1009, M))
    b = torch.randn(64, generator=noise_generator(torch.device("cpu"), 7, 4, 0, M))
    assert not torch.equal(a, b)


def test_every_micro_batch_of_consecutive_steps_gets_a_distinct_seed_in_64_and_in_32_bits():
    """8,192 ranks x 16 micro-batches x 2 steps: all seeds distinct, also in their low 32 bits (all a
    CPU generator keeps)."""
    seeds = np.array([noise_seed(3, s, m, M) for s in range(2) for m in range(M)], dtype=np.uint64)
    assert len(np.unique(seeds)) == seeds.size
    assert len(np.unique(seeds & np.uint64(0xFFFFFFFF))) == seeds.size


def test_seeds_number_the_run_densely_so_a_thousand_steps_never_collide():
    """Seed(step, micro) = base + step * M + micro (mod 2^64): injective in (step, micro) for a run, so
    the 8,192 x 16 x 1,000 grid is collision-free (and below 2^32 micro-batches, in 32 bits too)."""
    rng = np.random.default_rng(0)
    base = noise_seed(3, 0, 0, M)
    for s, m in zip(rng.integers(0, STEPS, 1000), rng.integers(0, M, 1000)):
        assert noise_seed(3, int(s), int(m), M) == (base + int(s) * M + int(m)) % 2**64
    assert STEPS * M < 2**32


def test_runs_with_other_seeds_start_elsewhere_and_a_micro_batch_out_of_range_is_refused():
    assert len({noise_seed(s, 0, 0, M) for s in range(1000)}) == 1000
    with pytest.raises(ValueError, match="outside 0..131071"):
        noise_seed(0, 0, M, M)
