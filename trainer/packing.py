"""Sequence packing: documents -> fixed-length rows -> PackedBatch (docs/architecture.md).

Text-only documents are split across rows where a row fills up (the continuation restarts its
positions in the next row). A document with an image never straddles rows: if it does not fit in
what is left of the current row it waits in a small queue and opens the next row, while later text
fills the current one; only when the queue is full is a row closed with padding. A document with
images longer than a row is cut at text positions into pieces of at most a row (each cut as late as
the row allows without cutting through an image; each piece then packs like a document), or, when
the document is `keep_whole`, skipped and counted (`skipped`, in the packer's state, and logged):
never truncated.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from model.batch import IGNORE_INDEX, PackedBatch, span_ends
from config import SpecialTokens

from .documents import ContextText, Document, ImageSegment

log = logging.getLogger(__name__)


@dataclass
class FlatDoc:
    """A document laid out as sequence positions, relative to its own start."""

    tokens: np.ndarray  # [L] int64
    is_image: np.ndarray  # [L] bool
    kv_hi: np.ndarray  # [L] int64, exclusive end of each query's span
    targets: np.ndarray  # [L] int64
    images: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (first patch, latent, max_t)

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, n: int) -> tuple["FlatDoc", "FlatDoc"]:
        """Split after n positions (not inside an image); the tail's spans and image slots restart at 0."""
        assert 0 < n < len(self) and not self.is_image[n - 1] and not self.is_image[n], "cut through an image"
        head = FlatDoc(self.tokens[:n], self.is_image[:n], self.kv_hi[:n], self.targets[:n],
                       [im for im in self.images if im[0] < n])
        tail = FlatDoc(self.tokens[n:], self.is_image[n:], self.kv_hi[n:] - n, self.targets[n:],
                       [(first - n, lat, mt) for first, lat, mt in self.images if first > n])
        return head, tail

    def cut_before(self, limit: int, patches_per_image: int) -> int:
        """The latest cut <= limit that leaves every image (BOI, patches, EOI) whole on one side."""
        cut = limit
        for first, _, _ in self.images:  # image positions: [first - 1, first + P] (BOI ... EOI)
            if first - 1 < cut <= first + patches_per_image:
                cut = first - 1
        return cut


def flatten_document(doc: Document, patches_per_image: int, tokens: SpecialTokens,
                     image_attention: str = "bidirectional") -> FlatDoc:
    """Lay a document out as positions: text ids, and BOI + patches + EOI per image; span ends by
    the span rule (`model.batch.span_ends`)."""
    P = patches_per_image
    toks, img, ctx, images = [], [], [], []
    pos = 0
    for seg in doc.segments:
        if isinstance(seg, ImageSegment):
            toks.append(np.array([tokens.boi] + [tokens.pad] * P + [tokens.eoi], dtype=np.int64))
            img.append(np.array([False] + [True] * P + [False]))
            ctx.append(np.zeros(P + 2, dtype=bool))
            images.append((pos + 1, seg.latent, seg.max_t))
            pos += P + 2
        else:
            ids = seg.ids if isinstance(seg, ContextText) else seg
            n = len(ids)
            toks.append(np.asarray(ids, dtype=np.int64))
            img.append(np.zeros(n, dtype=bool))
            ctx.append(np.full(n, isinstance(seg, ContextText)))
            pos += n
    t = np.concatenate(toks) if toks else np.zeros(0, np.int64)
    is_img = np.concatenate(img) if img else np.zeros(0, bool)
    is_ctx = np.concatenate(ctx) if ctx else np.zeros(0, bool)
    # Next-token targets: none from or onto an image patch, none onto context text, none past the end.
    targets = np.full(len(t), IGNORE_INDEX, dtype=np.int64)
    if len(t) > 1:
        ok = ~is_img[:-1] & ~is_img[1:] & ~is_ctx[1:]
        targets[:-1] = np.where(ok, t[1:], IGNORE_INDEX)
    hi = span_ends(len(t), [first for first, _, _ in images], P, image_attention)
    return FlatDoc(t, is_img, hi, targets, images)


@dataclass
class Row:
    """One packed row of length seq_len, as numpy arrays plus its images."""

    tokens: np.ndarray
    is_image: np.ndarray
    position_ids: np.ndarray
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    targets: np.ndarray
    images: list[tuple[int, torch.Tensor, int]]  # (first patch position, latent, max_t)

    @classmethod
    def empty(cls, seq_len: int, pad_id: int) -> "Row":
        idx = np.arange(seq_len, dtype=np.int64)
        return cls(
            tokens=np.full(seq_len, pad_id, np.int64), is_image=np.zeros(seq_len, bool),
            position_ids=np.zeros(seq_len, np.int64), kv_lo=idx.copy(), kv_hi=idx.copy(),
            targets=np.full(seq_len, IGNORE_INDEX, np.int64), images=[],
        )

    def place(self, doc: FlatDoc, offset: int) -> None:
        n = len(doc)
        sl = slice(offset, offset + n)
        self.tokens[sl] = doc.tokens
        self.is_image[sl] = doc.is_image
        self.position_ids[sl] = np.arange(n)
        self.kv_lo[sl] = offset
        self.kv_hi[sl] = doc.kv_hi + offset
        self.targets[sl] = doc.targets
        self.images.extend((first + offset, lat, mt) for first, lat, mt in doc.images)


class SequencePacker:
    """Streaming packer: `add` documents, collect finished rows; state is saved for exact resume."""

    def __init__(self, seq_len: int, patches_per_image: int, tokens: SpecialTokens, max_waiting: int = 4,
                 image_attention: str = "bidirectional") -> None:
        self.seq_len, self.P, self.tokens, self.max_waiting = seq_len, patches_per_image, tokens, max_waiting
        self.image_attention = image_attention
        self.row = Row.empty(seq_len, tokens.pad)
        self.fill = 0
        self.waiting: deque[FlatDoc] = deque()  # image documents that open the next row
        self.ready: deque[Row] = deque()
        self.skipped: Counter = Counter()  # documents (and their positions) too long and not to be split

    def add(self, doc: Document) -> None:
        flat = flatten_document(doc, self.P, self.tokens, self.image_attention)
        if len(flat) == 0:
            return
        if len(flat) > self.seq_len and (flat.images or doc.keep_whole):
            if doc.keep_whole:
                self.skipped["documents"] += 1
                self.skipped["positions"] += len(flat)
                log.warning("skipped a document of %d positions (%d images): longer than a row of train.seq_len=%d "
                            "and not to be split (its stream's recipe.split_long is false); %d skipped so far",
                            len(flat), len(flat.images), self.seq_len, self.skipped["documents"])
                return
            if self.P + 2 > self.seq_len:
                raise ValueError(f"an image takes {self.P + 2} positions ({self.P} patches + BOI/EOI) but a row "
                                 f"holds {self.seq_len}; raise train.seq_len")
            while len(flat) > self.seq_len:  # whole-image pieces of at most a row, each packed as a document
                head, flat = flat.split(flat.cut_before(self.seq_len, self.P))
                self._add_flat(head, keep_whole=bool(head.images))
        self._add_flat(flat, keep_whole=bool(flat.images) or doc.keep_whole)

    def _add_flat(self, flat: FlatDoc, keep_whole: bool) -> None:
        if keep_whole:
            if len(flat) <= self.seq_len - self.fill and not self.waiting:
                self._place(flat)
                return
            self.waiting.append(flat)
            if len(self.waiting) > self.max_waiting:
                self._close_row()
            return
        while len(flat) > 0:
            space = self.seq_len - self.fill
            if len(flat) <= space:
                self._place(flat)
                return
            head, flat = flat.split(space)
            self._place(head)

    def _place(self, flat: FlatDoc) -> None:
        self.row.place(flat, self.fill)
        self.fill += len(flat)
        if self.fill == self.seq_len:
            self._close_row()

    def _close_row(self) -> None:
        """Emit the current row (padding what is left) and open the next one with waiting docs."""
        self.ready.append(self.row)
        self.row, self.fill = Row.empty(self.seq_len, self.tokens.pad), 0
        while self.waiting and len(self.waiting[0]) <= self.seq_len - self.fill:
            self._place(self.waiting.popleft())
        if self.waiting and self.fill == 0:
            raise AssertionError("unreachable: a waiting document always fits an empty row")

    def flush(self) -> None:
        """Close the current row and every waiting document's (a finite source ran out)."""
        while self.fill > 0 or self.waiting:
            self._close_row()

    def pop_rows(self, n: int) -> list[Row] | None:
        """Return n finished rows if available (FIFO), else None."""
        if len(self.ready) < n:
            return None
        return [self.ready.popleft() for _ in range(n)]

    def state_dict(self) -> dict:
        """Plain state (tensors, ints, lists, dicts: loadable with weights_only=True)."""
        return {"row": to_plain(self.row), "fill": self.fill, "waiting": [to_plain(d) for d in self.waiting],
                "ready": [to_plain(r) for r in self.ready], "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.row, self.fill = from_plain(Row, state["row"]), int(state["fill"])
        self.waiting = deque(from_plain(FlatDoc, d) for d in state["waiting"])
        self.ready = deque(from_plain(Row, r) for r in state["ready"])
        self.skipped = Counter(state.get("skipped", {}))


def to_plain(obj: Row | FlatDoc) -> dict:
    """A Row or FlatDoc as a dict of tensors; images as [first, latent, max_t] lists."""
    out = {f.name: torch.from_numpy(np.array(getattr(obj, f.name))) for f in fields(obj)
           if f.name != "images"}
    out["images"] = [[int(first), latent, int(max_t)] for first, latent, max_t in obj.images]
    return out


def from_plain(cls: type, state: dict) -> Row | FlatDoc:
    arrays = {k: v.numpy() for k, v in state.items() if k != "images"}
    return cls(**arrays, images=[(int(first), latent, int(max_t)) for first, latent, max_t in state["images"]])


def collate(rows: list[Row], latent_shape: tuple[int, int, int]) -> PackedBatch:
    """Stack rows into a PackedBatch; images are listed row by row in order of position."""
    images = [(r, first, lat, mt) for r, row in enumerate(rows) for first, lat, mt in row.images]
    P = int(rows[0].is_image.sum() // max(len(rows[0].images), 1)) if rows[0].images else 0

    def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(r, name) for r in rows])).to(dtype)

    if images:
        P = int(sum(r.is_image.sum() for r in rows)) // len(images)
        latents = torch.stack([lat for _, _, lat, _ in images]).float()
        slots = torch.tensor([[r, first, P] for r, first, _, _ in images], dtype=torch.int64)
        max_t = torch.tensor([mt for *_, mt in images], dtype=torch.int64)
    else:
        latents = torch.zeros((0, *latent_shape))
        slots = torch.zeros((0, 3), dtype=torch.int64)
        max_t = torch.zeros(0, dtype=torch.int64)
    return PackedBatch(
        tokens=stack("tokens", torch.int64), is_image=stack("is_image", torch.bool),
        latents=latents, image_slots=slots, image_max_t=max_t,
        position_ids=stack("position_ids", torch.int64),
        kv_lo=stack("kv_lo", torch.int32), kv_hi=stack("kv_hi", torch.int32),
        text_targets=stack("targets", torch.int64),
    )
