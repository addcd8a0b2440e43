"""The per-rank sample order of streaming sources (trainer/sample_order.py)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.sample_order import EpochOrder, RankCursor, deal, merge, position_at, segments_length, slice_segments


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_is_a_permutation_and_changes_per_epoch(shuffle):
    sizes = np.array([7, 1, 30, 12, 5, 19])
    orders = [EpochOrder(sizes, seed=3, epoch=e, shuffle=shuffle, block=16) for e in (0, 1)]
    ids = [[o.sample_id(p) for p in range(sizes.sum())] for o in orders]
    for got in ids:
        assert sorted(got) == list(range(sizes.sum()))
    assert (ids[0] != ids[1]) == shuffle
    assert ids == [[EpochOrder(sizes, 3, e, shuffle, 16).sample_id(p) for p in range(sizes.sum())] for e in (0, 1)]
    with pytest.raises(IndexError):
        orders[0].sample_id(int(sizes.sum()))


def test_a_block_of_the_order_touches_few_shards():
    """Shuffling within blocks keeps a rank's stretch of the order on a few shards (locality)."""
    sizes = np.full(100, 50)
    order = EpochOrder(sizes, seed=0, epoch=0, shuffle=True, block=200)
    shards = {order.sample_id(p) // 50 for p in range(200, 400)}
    assert len(shards) <= 5


def test_deal_and_slices_cover_exactly():
    segs = [[0, 5], [10, 12], [20, 31]]
    parts = [deal(segs, 3, r) for r in range(3)]
    flat = [position_at(p, k) for p in parts for k in range(segments_length(p))]
    assert flat == [*range(0, 5), 10, 11, *range(20, 31)]
    assert [segments_length(p) for p in parts] == [6, 6, 6]
    assert slice_segments(segs, 4, 8) == [[4, 5], [10, 12], [20, 21]]


def test_merge_deals_what_is_left_and_counts_ranks_ahead():
    old = [RankCursor(0, [[0, 50]], 20), RankCursor(0, [[50, 100]], 35), RankCursor(1, [[0, 33]], 4)]
    new = [merge(old, 2, r) for r in range(2)]
    assert all(repeated == 4 for _, repeated in new)
    left = [position_at(c.part, k) for c, _ in new for k in range(segments_length(c.part))]
    assert left == [*range(20, 50), *range(85, 100)] and all(c.epoch == 0 for c, _ in new)
