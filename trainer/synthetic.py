"""A built-in learnable document source, behind the same interface as the streaming loader.

Images are class patterns in latent space (plus noise) captioned with the class's fixed token
sequence (`images_per_document` > 1: several captioned images per document); text follows a fixed
random Markov chain. Document i depends only on (seed, i), so the
source's whole state is the index of the next document. The held-out documents (`heldout=True`)
come from the same patterns, captions and chain but a disjoint seed sequence (seed, i, 1).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from config import DataConfig, DocumentRecipeConfig, ModelConfig

from .documents import Document, DocumentBuilder


class SyntheticSource:
    """Iterator over Documents; `state_dict` / `load_state_dict` give exact resume."""

    def __init__(self, data: DataConfig, model: ModelConfig, builder: DocumentBuilder, seed: int,
                 rank: int = 0, world_size: int = 1, heldout: bool = False) -> None:
        self.cfg, self.builder, self.heldout = data.synthetic, builder, heldout
        self.text_fraction = data.text_fraction
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.index = 0
        rng = np.random.default_rng([seed, 7])
        first = max(vars(model.tokens).values()) + 1  # ordinary tokens start after the specials
        self.vocab = np.arange(first, model.vocab_size)
        shape = (self.cfg.num_classes, model.latent_channels, model.latent_size, model.latent_size)
        self.patterns = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        self.captions = [rng.choice(self.vocab, size=4) for _ in range(self.cfg.num_classes)]
        self.chain = rng.choice(self.vocab, size=(len(self.vocab), 2))  # two likely successors each

    def __iter__(self) -> Iterator[Document]:
        return self

    def __next__(self) -> Document:
        # Ranks take interleaved document indices so their streams are disjoint.
        index = self.index * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, index, 1] if self.heldout else [self.seed, index])
        self.index += 1
        if rng.random() < self.text_fraction:
            return self.builder.text(self._text(rng))
        n = self.cfg.images_per_document
        if n > 1:  # several caption-image pairs: an interleaved document with generated images
            parts: list[tuple[str, np.ndarray | torch.Tensor]] = []
            for _ in range(int(rng.integers(1, n + 1))):
                k = int(rng.integers(self.cfg.num_classes))
                parts += [("text", self.captions[k]), ("generate", self._latent(k, rng))]
            return self.builder.interleaved(parts, DocumentRecipeConfig(), rng)
        k = int(rng.integers(self.cfg.num_classes))
        return self.builder.image_caption(self.captions[k], self._latent(k, rng), rng)

    def _latent(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        """Class k's pattern plus noise [C, h, w]."""
        return self.patterns[k] + self.cfg.image_noise * torch.from_numpy(
            rng.standard_normal(self.patterns[k].shape).astype(np.float32))

    def _text(self, rng: np.random.Generator) -> np.ndarray:
        n = int(rng.integers(self.cfg.text_len_min, self.cfg.text_len_max + 1))
        ids = np.empty(n, dtype=np.int64)
        ids[0] = rng.choice(self.vocab)
        choices = rng.integers(0, 2, size=n)
        for i in range(1, n):
            ids[i] = self.chain[ids[i - 1] - self.vocab[0], choices[i]]
        return ids

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
