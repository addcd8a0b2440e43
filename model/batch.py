"""The packed batch: the contract between data loading, the model, the kernels and parallelism.

One row is a fixed-length sequence of documents packed back to back (docs/architecture.md §2). Attention is
given per query as one contiguous key span [kv_lo, kv_hi); nothing else about documents or images
reaches the attention kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


def span_ends(length: int, image_starts: Iterable[int], patches_per_image: int,
              image_attention: str = "bidirectional") -> np.ndarray:
    """The span rule (docs/architecture.md §2.3) for one document laid out from position 0: the
    exclusive end kv_hi [length] of each query's key span; the span starts at the document's start.

    Every position is causal (i + 1), except that with `image_attention="bidirectional"` the
    `patches_per_image` patches of an image starting at s all end at s + P (BOI/EOI stay causal).
    The trainer's packer and inference's layout both call this.
    """
    hi = np.arange(1, length + 1, dtype=np.int64)
    if image_attention == "bidirectional":
        for s in image_starts:
            hi[s:s + patches_per_image] = s + patches_per_image
    return hi


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [B, S] int64; image-patch positions hold the pad id
    is_image: torch.Tensor  # [B, S] bool; True at image-patch positions
    latents: torch.Tensor  # [N_img, C, h, w] clean latents, in order of appearance (row-major)
    image_slots: torch.Tensor  # [N_img, 3] int64: (row, first patch position, number of patches)
    image_max_t: torch.Tensor  # [N_img] int64: timesteps are drawn from [0, max_t); 0: a condition image (clean, no loss)
    position_ids: torch.Tensor  # [B, S] int64; restart at 0 at each document
    kv_lo: torch.Tensor  # [B, S] int32; query i sees keys j with kv_lo[i] <= j < kv_hi[i]
    kv_hi: torch.Tensor  # [B, S] int32
    text_targets: torch.Tensor  # [B, S] int64; IGNORE_INDEX where there is no LM loss

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_images(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Every tensor on `device` (`non_blocking`: asynchronous from pinned host memory)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in dataclasses.fields(self)}
        )

    def pin_memory(self) -> "PackedBatch":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)}
        )

    @property
    def generated(self) -> torch.Tensor:
        """[N_img] bool: images that are noised and carry the diffusion loss (not conditions)."""
        return self.image_max_t > 0

    def num_text_tokens(self) -> int:
        """Number of positions with an LM target (the denominator of the step's LM loss)."""
        return int((self.text_targets != IGNORE_INDEX).sum())

    def check(self) -> None:
        """Assert the invariants the kernels rely on (cheap; call in tests and on data errors)."""
        B, S = self.tokens.shape
        for name in ("is_image", "position_ids", "kv_lo", "kv_hi", "text_targets"):
            shape = tuple(getattr(self, name).shape)
            if shape != (B, S):
                raise ValueError(f"PackedBatch.{name} has shape {shape}, expected {(B, S)}")
        if not (self.kv_lo <= self.kv_hi).all():
            raise ValueError("PackedBatch: kv_lo > kv_hi somewhere")
        if (self.kv_lo[:, 1:] < self.kv_lo[:, :-1]).any() or (self.kv_hi[:, 1:] < self.kv_hi[:, :-1]).any():
            raise ValueError("PackedBatch: kv_lo/kv_hi must be non-decreasing along each row")
        if int(self.is_image.sum()) != int(self.image_slots[:, 2].sum()):
            raise ValueError("PackedBatch: image slots do not cover the is_image positions")
        if self.image_slots.shape[0] != self.latents.shape[0] or self.image_max_t.shape[0] != self.latents.shape[0]:
            raise ValueError("PackedBatch: one image slot and one max_t per latent expected")
