"""Pure-torch span utilities shared by the attention backends.

Block-range arithmetic for span-driven tile skipping (what the Triton kernels iterate), an exact
dense count of the tiles that intersect the mask (the ground truth the kernels are tested against),
and a small per-batch cache so that work derived from the spans is done once for all layers.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from .reference import span_mask


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


class SpanCache:
    """Tiny LRU cache keyed on the identity and in-place version of (kv_lo, kv_hi).

    A model passes the same span tensors to every layer, so e.g. a FlexAttention BlockMask is built
    once per batch. Entries hold weak references: a freed tensor whose memory is reused by the next
    batch can never produce a stale hit (a bare data_ptr key could).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[weakref.ref, weakref.ref, int, int, Any]] = OrderedDict()

    def get(self, kv_lo: torch.Tensor, kv_hi: torch.Tensor, tag: Any, build: Callable[[], Any]) -> Any:
        """Return the cached value for (kv_lo, kv_hi, tag), building it with `build()` on a miss."""
        key = (id(kv_lo), id(kv_hi), tag)
        hit = self._entries.get(key)
        if hit is not None:
            lo_ref, hi_ref, v_lo, v_hi, value = hit
            if lo_ref() is kv_lo and hi_ref() is kv_hi and kv_lo._version == v_lo and kv_hi._version == v_hi:
                self._entries.move_to_end(key)
                return value
            del self._entries[key]
        value = build()
        self._entries[key] = (weakref.ref(kv_lo), weakref.ref(kv_hi), kv_lo._version, kv_hi._version, value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


def query_block_bounds(kv_lo: torch.Tensor, kv_hi: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Key-block ranges each query block iterates: int64 [B, n_qb, 4] = (start, full_lo, full_hi, end).

    Key blocks [start, end) cover the union of the block's non-empty spans; [full_lo, full_hi) are the
    tiles fully inside every row's span (no element mask needed). Mirrors `_q_block_bounds` in
    triton_span_fwd.py; used by the benchmark and by tests.
    """
    B, S = kv_lo.shape
    n_qb = cdiv(S, block_m)
    pad = n_qb * block_m - S
    lo = torch.nn.functional.pad(kv_lo.long(), (0, pad), value=0).view(B, n_qb, block_m)
    hi = torch.nn.functional.pad(kv_hi.long(), (0, pad), value=0).view(B, n_qb, block_m)
    valid = (torch.arange(n_qb * block_m, device=kv_lo.device) < S).view(1, n_qb, block_m)
    nonempty = valid & (hi > lo)
    lo_min = torch.where(nonempty, lo, S).amin(-1)  # [B, n_qb]
    hi_max = torch.where(nonempty, hi, 0).amax(-1)
    lo_max = torch.where(valid, lo, S).amax(-1)
    hi_min = torch.where(valid, hi, 0).amin(-1)
    start = lo_min // block_n
    end = (hi_max + block_n - 1) // block_n
    f0 = torch.minimum(torch.maximum((lo_max + block_n - 1) // block_n, start), end)
    f1 = torch.maximum(torch.minimum(hi_min // block_n, end), f0)
    return torch.stack([start, f0, f1, end], -1)


def key_block_bounds(
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, block_m: int, block_n: int, num_keys: int | None = None
) -> torch.Tensor:
    """Query-block ranges each key block iterates in the backward: int32 [B, n_kb, 4].

    (start, full_lo, full_hi, end) as in `query_block_bounds`, from the transposed view: because both
    span ends are non-decreasing, the rows that see a key block form one contiguous range, found with
    searchsorted (first row with kv_hi > block start, last row with kv_lo < block end), then trimmed
    to non-empty rows. num_keys defaults to S.
    """
    B, S = kv_lo.shape
    S_k = S if num_keys is None else num_keys
    dev = kv_lo.device
    lo, hi = kv_lo.long().contiguous(), kv_hi.long().contiguous()  # [B, S]
    n_kb = cdiv(S_k, block_n)
    n0 = (torch.arange(n_kb, device=dev) * block_n).expand(B, n_kb).contiguous()  # [B, n_kb]
    n1 = torch.clamp(n0 + block_n, max=S_k)
    # Rows [a, b) have kv_hi > n0 and kv_lo < n1.
    a = torch.searchsorted(hi, n0, right=True)
    b = torch.searchsorted(lo, n1, right=False)
    # Trim rows with empty spans (padding) off both ends of [a, b).
    idx = torch.arange(S, device=dev).expand(B, S)
    nonempty = hi > lo
    next_ne = torch.where(nonempty, idx, S).flip(-1).cummin(-1).values.flip(-1)  # [B, S]
    next_ne = torch.cat([next_ne, torch.full((B, 1), S, device=dev, dtype=torch.long)], -1)
    prev_ne = torch.where(nonempty, idx, -1).cummax(-1).values
    prev_ne = torch.cat([torch.full((B, 1), -1, device=dev, dtype=torch.long), prev_ne], -1)  # [B, S+1]
    a2 = next_ne.gather(1, a)
    b2 = prev_ne.gather(1, b) + 1
    start = a2 // block_m
    end = torch.where(a2 < b2, (b2 + block_m - 1) // block_m, start)
    # Rows [c, d) have kv_lo <= n0 and kv_hi >= n1: the whole key block is inside their spans.
    c = torch.searchsorted(hi, n1, right=False)
    d = torch.searchsorted(lo, n0, right=True)
    f0 = (c + block_m - 1) // block_m
    f1 = torch.where(n1 - n0 == block_n, d // block_m, f0)
    f0 = torch.minimum(torch.maximum(f0, start), end)
    f1 = torch.maximum(torch.minimum(f1, end), f0)
    return torch.stack([start, f0, f1, end], -1).to(torch.int32).contiguous()


def mask_tile_counts(
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, block_m: int, block_n: int, num_keys: int | None = None
) -> tuple[int, int]:
    """(tiles intersecting the mask, of which partial) summed over the batch, from the dense mask.

    Independent of the kernels' block arithmetic: builds the [S, S] boolean mask row by row and
    reduces it per (block_m x block_n) tile. A tile is partial unless every element is True.
    """
    B, S = kv_lo.shape
    S_k = S if num_keys is None else num_keys
    n_qb, n_kb = cdiv(S, block_m), cdiv(S_k, block_n)
    hit = partial = 0
    for b in range(B):
        mask = span_mask(kv_lo[b : b + 1], kv_hi[b : b + 1], S_k)[0]  # [S, S_k]
        mask = torch.nn.functional.pad(mask, (0, n_kb * block_n - S_k, 0, n_qb * block_m - S))
        tiles = mask.view(n_qb, block_m, n_kb, block_n)
        any_ = tiles.any(3).any(1)  # [n_qb, n_kb]
        all_ = tiles.all(3).all(1)
        hit += int(any_.sum())
        partial += int((any_ & ~all_).sum())
    return hit, partial


def causal_tile_count(seq_len: int, block_m: int, block_n: int) -> int:
    """Tiles a causal-only kernel computes on one row: key blocks starting before the query block ends."""
    n_qb = cdiv(seq_len, block_m)
    return sum(cdiv(min((qb + 1) * block_m, seq_len), block_n) for qb in range(n_qb))


def is_document_causal(kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> bool:
    """True when every non-empty row is plain causal inside its document (no image spans).

    That is: kv_hi[i] == i + 1, and kv_lo[i] is either i (a document starts) or kv_lo[i-1] with row
    i-1 non-empty (the same document continues). Empty rows (padding) are allowed anywhere.
    """
    B, S = kv_lo.shape
    i = torch.arange(S, device=kv_lo.device)
    nonempty = kv_hi > kv_lo
    causal = kv_hi == i + 1
    prev_lo = torch.cat([torch.full_like(kv_lo[:, :1], -1), kv_lo[:, :-1]], 1)
    prev_ne = torch.cat([torch.zeros_like(nonempty[:, :1]), nonempty[:, :-1]], 1)
    contiguous = (kv_lo == i) | ((kv_lo == prev_lo) & prev_ne)
    return bool((~nonempty | (causal & contiguous)).all())


def spans_from_documents(
    docs: list[tuple[int, list[tuple[int, int]]]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans [S] int32 of one row from documents packed back to back, then trailing padding.

    docs: (length, [(first patch offset in the document, number of patches), ...]) each. Inside a
    document starting at s: kv_lo = s, kv_hi[i] = max(i + 1, end of the image containing i).
    Padding rows get the empty span kv_lo = kv_hi = i. For tests and benchmarks.
    """
    i = torch.arange(seq_len, dtype=torch.int32)
    lo, hi = i.clone(), i.clone()
    s = 0
    for length, images in docs:
        if s + length > seq_len:
            raise ValueError(f"documents overflow the row: {s} + {length} > {seq_len}")
        lo[s : s + length] = s
        hi[s : s + length] = i[s : s + length] + 1
        for offset, n in images:
            if offset + n > length:
                raise ValueError(f"image ({offset}, {n}) does not fit a document of length {length}")
            hi[s + offset : s + offset + n] = s + offset + n
        s += length
    return lo, hi
