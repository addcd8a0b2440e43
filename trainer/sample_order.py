"""Which samples of a stream each data-parallel rank reads, per epoch, resumable on any layout.

An epoch's order is a permutation of the stream's samples: shards shuffled, then positions shuffled
within blocks of `block` consecutive positions (so a rank's stretch of the order touches few
shards: locality for remote or cached shards). It is computed lazily from the shard sizes, one
block at a time, never as an array over the whole stream (billions of samples).

The positions of an epoch still to be read are a list of [lo, hi) segments; `deal` cuts their
concatenation into one contiguous part per rank. A rank's state is (epoch, its part, how many it
took). On a different number of ranks, `merge` concatenates what every old rank had left of the
earliest epoch and deals that again: nothing of that epoch is skipped or read twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Segments = list[list[int]]  # [[lo, hi), ...] positions of an epoch's order


def segments_length(segs: Segments) -> int:
    return sum(hi - lo for lo, hi in segs)


def slice_segments(segs: Segments, start: int, stop: int) -> Segments:
    """Positions start..stop (counted along the concatenation of segs) as segments."""
    out, offset = [], 0
    for lo, hi in segs:
        a, b = max(start - offset, 0), min(stop - offset, hi - lo)
        if a < b:
            out.append([lo + a, lo + b])
        offset += hi - lo
    return out


def deal(segs: Segments, world: int, rank: int) -> Segments:
    """Rank `rank`'s contiguous share (sizes differ by at most one) of the concatenated segments."""
    n = segments_length(segs)
    return slice_segments(segs, rank * n // world, (rank + 1) * n // world)


def position_at(segs: Segments, k: int) -> int:
    """The k-th position along the concatenated segments."""
    for lo, hi in segs:
        if k < hi - lo:
            return lo + k
        k -= hi - lo
    raise IndexError(k)


class EpochOrder:
    """Position in epoch `epoch`'s order -> sample id; lazy, O(number of shards) memory."""

    def __init__(self, shard_sizes: np.ndarray, seed: int, epoch: int, shuffle: bool, block: int) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.n = int(sizes.sum())
        self.seed, self.epoch, self.shuffle, self.block = seed, epoch, shuffle, block
        first_id = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        order = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
        self.first_id = first_id[order]  # sample id of each shuffled shard's first sample
        self.first_pos = np.concatenate([[0], np.cumsum(sizes[order])[:-1]])
        self._block: tuple[int, np.ndarray] | None = None

    def sample_id(self, pos: int) -> int:
        if not 0 <= pos < self.n:
            raise IndexError(pos)
        if self.shuffle:
            b = pos // self.block
            if self._block is None or self._block[0] != b:
                length = min(self.block, self.n - b * self.block)
                self._block = (b, np.random.default_rng([self.seed, self.epoch, b]).permutation(length))
            pos = b * self.block + int(self._block[1][pos - b * self.block])
        shard = int(np.searchsorted(self.first_pos, pos, side="right")) - 1
        return int(self.first_id[shard] + pos - self.first_pos[shard])


@dataclass
class RankCursor:
    """Where one rank is in one stream: its part of the current epoch and how much of it it read."""

    epoch: int = 0
    part: Segments = field(default_factory=list)
    taken: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "part": [list(s) for s in self.part], "taken": self.taken}

    @classmethod
    def from_state(cls, state: dict) -> "RankCursor":
        return cls(int(state["epoch"]), [list(s) for s in state["part"]], int(state["taken"]))

    def left(self) -> Segments:
        return slice_segments(self.part, self.taken, segments_length(self.part))


def merge(cursors: list[RankCursor], world: int, rank: int) -> tuple[RankCursor, int]:
    """The cursor of `rank` of `world` continuing from one cursor per old rank (in rank order), and
    how many samples will be read again: those that ranks already in a later epoch took there."""
    epoch = min(c.epoch for c in cursors)
    left = [s for c in cursors if c.epoch == epoch for s in c.left()]
    repeated = sum(c.taken for c in cursors if c.epoch > epoch)
    return RankCursor(epoch, deal(left, world, rank), 0), repeated
