"""Batched model calls over growing sequences, with or without a KV cache.

Each row is one document (positions restart at 0). Rows run together in a `Group`: right-aligned,
left-padded, with the packer's span rule (`model.batch.span_ends`: causal; bidirectional inside each
image unless model.image_attention=causal; padding sees nothing and is seen by nothing). With a
cache, a call feeds only the positions a row has not fed yet and attends over the cached keys;
without one, every call recomputes the whole sequence and returns the same outputs. Rows keep their
own cache between groups; a group stacks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from config import ModelConfig
from model.batch import span_ends
from model.layers import KVCache
from model.transfusion import ModelOutput, TransfusionModel

from .prompts import Segment


@dataclass
class ImageSlot:
    start: int  # row position of the first patch
    latent: torch.Tensor  # [C, h, w] fp32: clean, or the noisy sample while it is being denoised
    t: int = 0  # diffusion timestep the latent is at (0 = clean)


@dataclass
class RowState:
    """One document: its positions so far, its images, and how many positions the model has fed."""

    tokens: list[int] = field(default_factory=list)  # image patches hold the pad id
    is_image: list[bool] = field(default_factory=list)
    images: list[ImageSlot] = field(default_factory=list)
    n_fed: int = 0  # positions [0, n_fed) have been run through the model (cached when caching)
    cache: KVCache | None = None  # batch-1 cache of those positions while the row is not in a group

    def __len__(self) -> int:
        return len(self.tokens)

    def add_tokens(self, ids: list[int]) -> None:
        self.tokens.extend(ids)
        self.is_image.extend([False] * len(ids))

    def add_image(self, latent: torch.Tensor, num_patches: int, pad_id: int, t: int = 0) -> ImageSlot:
        """Append the patch positions of one image (BOI before and EOI after are tokens)."""
        slot = ImageSlot(len(self.tokens), latent, t)
        self.images.append(slot)
        self.tokens.extend([pad_id] * num_patches)
        self.is_image.extend([True] * num_patches)
        return slot

    @classmethod
    def from_segments(cls, segments: list[Segment], cfg: ModelConfig) -> "RowState":
        row = cls()
        t = cfg.tokens
        for seg in segments:
            if isinstance(seg, list):
                row.add_tokens(seg)
            elif cfg.image_representation == "tokens":  # a code grid: plain ids, BOI codes EOI
                row.add_tokens([t.boi] + (seg.flatten().long() + cfg.image_token_offset).tolist() + [t.eoi])
            else:
                row.add_tokens([t.boi])
                row.add_image(seg, cfg.patches_per_image, t.pad)
                row.add_tokens([t.eoi])
        return row


@dataclass
class Layout:
    """Model inputs for rows right-aligned in `width` columns (the last `fed` of them are fed)."""

    tokens: torch.Tensor  # [R, fed]
    is_image: torch.Tensor  # [R, fed]
    position_ids: torch.Tensor  # [R, fed]
    kv_lo: torch.Tensor  # [R, fed] int32, indexing all `width` columns
    kv_hi: torch.Tensor  # [R, fed]
    latents: torch.Tensor  # [N_fed_img, C, h, w], row-major
    timesteps: torch.Tensor  # [N_fed_img]
    new_images: list[int]  # indices into latents of images at positions a row had not fed yet


def build_layout(rows: list[RowState], width: int, fed: int, cfg: ModelConfig, device: torch.device) -> Layout:
    """Lay rows out right-aligned in `width` columns and keep the inputs of the last `fed` columns."""
    R, P = len(rows), cfg.patches_per_image
    col = np.arange(width, dtype=np.int64)
    tokens = np.full((R, width), cfg.tokens.pad, np.int64)
    is_image = np.zeros((R, width), bool)
    pos = np.zeros((R, width), np.int64)
    lo, hi = np.tile(col, (R, 1)), np.tile(col, (R, 1))  # padding: empty spans
    latents, steps, new = [], [], []
    first = width - fed
    for r, row in enumerate(rows):
        off = width - len(row)
        assert off >= 0, "row longer than the layout"
        sl = slice(off, width)
        tokens[r, sl], is_image[r, sl] = row.tokens, row.is_image
        pos[r, sl] = np.arange(len(row))
        starts = [img.start for img in row.images]
        lo[r, sl], hi[r, sl] = off, span_ends(len(row), starts, P, cfg.image_attention) + off
        for img in row.images:
            c = img.start + off
            if c >= first:
                if img.start >= row.n_fed:
                    new.append(len(latents))
                latents.append(img.latent)
                steps.append(img.t)
            else:
                assert c + P <= first, "an image straddles the cached prefix and the fed columns"
    C, s = cfg.latent_channels, cfg.latent_size

    def tail(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a[:, first:])).to(device=device, dtype=dtype)

    return Layout(
        tokens=tail(tokens, torch.int64), is_image=tail(is_image, torch.bool),
        position_ids=tail(pos, torch.int64), kv_lo=tail(lo, torch.int32), kv_hi=tail(hi, torch.int32),
        latents=torch.stack(latents).to(device) if latents else torch.zeros(0, C, s, s, device=device),
        timesteps=torch.tensor(steps, dtype=torch.int64, device=device), new_images=new,
    )


def stack_caches(caches: list[KVCache | None], lengths: list[int]) -> KVCache:
    """Batch-1 caches of different lengths -> one cache, each row right-aligned (left padding)."""
    width = max(lengths, default=0)
    ref = next((c for c, n in zip(caches, lengths) if c is not None and n > 0), None)
    out = KVCache()
    if ref is None:
        return out
    for name in ref.keys:
        for attr in ("keys", "values"):
            parts = []
            for c, n in zip(caches, lengths):
                assert n == 0 or c is not None, "a row with fed positions has no cache"
                t = getattr(c, attr)[name] if n > 0 else getattr(ref, attr)[name][:, :0]  # [1, n, H_kv, D]
                parts.append(F.pad(t, (0, 0, 0, 0, width - n, 0)))  # left-pad to [1, width, H_kv, D]
            getattr(out, attr)[name] = torch.cat(parts)
    return out


class Group:
    """Rows run in one batch; their caches are stacked while the group lives (see `release`)."""

    def __init__(self, model: TransfusionModel, rows: list[RowState], use_cache: bool) -> None:
        self.model, self.rows, self.use_cache = model, rows, use_cache
        self.cfg: ModelConfig = model.cfg
        self.cache: KVCache | None = None
        if use_cache:
            self.cache = stack_caches([r.cache for r in rows], [r.n_fed for r in rows])
            for r in rows:
                r.cache = None

    @torch.no_grad()
    def forward(self, append: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row's unfed positions; return (last-position logits [R, V] fp32, noise
        predictions [N_new, C, h, w] fp32 of images at unfed positions, row-major).

        With append=False the positions stay unfed (diffusion steps re-run the noisy patches).
        All rows must have the same number of unfed positions, except rows with nothing fed yet.
        """
        rows, device = self.rows, next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        todo = [len(r) - r.n_fed for r in rows]
        n = max(todo)
        assert all(u == n or r.n_fed == 0 for u, r in zip(todo, rows)), "rows out of step"
        if self.use_cache:
            assert self.cache is not None
            width = self.cache.length + n
            assert all(self.cache.length - r.n_fed >= 0 for r in rows)
            lay = build_layout(rows, width, n, self.cfg, device)
            self.cache.frozen = not append
            try:
                out: ModelOutput = self.model(
                    lay.tokens, lay.position_ids, lay.kv_lo, lay.kv_hi, lay.is_image,
                    lay.latents.to(dtype), lay.timesteps, cache=self.cache,
                )
            finally:
                self.cache.frozen = False
        else:
            width = max(len(r) for r in rows)
            lay = build_layout(rows, width, width, self.cfg, device)
            out = self.model(
                lay.tokens, lay.position_ids, lay.kv_lo, lay.kv_hi, lay.is_image,
                lay.latents.to(dtype), lay.timesteps,
            )
        if append:
            for r in rows:
                r.n_fed = len(r)
        return out.last_logits().float(), out.noise_pred[lay.new_images].float()

    def release(self) -> None:
        """Hand each row its own (unpadded) slice of the stacked cache."""
        if self.cache is not None:
            W = self.cache.length
            for i, r in enumerate(self.rows):
                r.cache = self.cache.map(lambda t, i=i, n=r.n_fed: t[i:i + 1, W - n:])
            self.cache = None
