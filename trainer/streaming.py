"""Training documents from mosaicml-streaming shards (written by data_prep/), mixed by tokens.

Each configured stream is its own `StreamingDataset` over MDS shards (schema: data_prep/schema.py);
streaming does the per-rank partitioning, shuffling and shard caching. Streams are mixed by
*tokens*: the next document comes from the stream furthest below its share of the positions
emitted so far, so a 1:1 mix means as many image positions as text positions (the paper's mix).

Exact resume: the state is, per stream, the epoch and the number of samples this rank consumed in
it. A restored stream fast-forwards inside streaming (which drops the first samples of each rank's
partition) instead of re-reading them. Randomness per document (recipe choices, the latent draw)
comes from a generator seeded by (seed, stream, epoch, sample), never from global state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from data_prep.schema import draw_latent, sample_latents
from model.config_base import ConfigError

from .config import Config, StreamConfig
from .documents import Document, DocumentBuilder


def check_dataset_info(stream: StreamConfig, cfg: Config) -> None:
    """Fail early, naming the field, when shards do not fit the model config."""
    info_path = Path(stream.path) / "dataset_info.json"
    if not (Path(stream.path) / "index.json").is_file() and stream.remote is None:
        raise ConfigError(f"data stream '{stream.path}' has no index.json; run data_prep first (or fix the path)")
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    m = cfg.model
    shape = info.get("latent_shape")
    want = [m.latent_channels, m.latent_size, m.latent_size]
    if stream.kind == "image" and shape is not None and list(shape) != want:
        raise ConfigError(
            f"data stream '{stream.path}' holds latents of shape {shape} but the model expects {want} "
            "(model.latent_channels, model.latent_size)"
        )
    vocab = info.get("vocab_size")
    if vocab is not None and vocab > m.vocab_size:
        raise ConfigError(f"data stream '{stream.path}' uses a vocabulary of {vocab} > model.vocab_size={m.vocab_size}")
    ids = info.get("special_tokens") or {}
    for name, value in vars(m.tokens).items():
        if name in ids and ids[name] != value:
            raise ConfigError(
                f"data stream '{stream.path}' was tokenized with {name}={ids[name]} but model.tokens.{name}={value}"
            )


class StreamingSource:
    """Iterator over Documents from several MDS streams, mixed by tokens; exact resume per rank."""

    def __init__(self, cfg: Config, builder: DocumentBuilder, replication: int = 1) -> None:
        d = cfg.data
        self.cfg, self.builder = cfg, builder
        self.streams = d.streams
        for s in self.streams:
            check_dataset_info(s, cfg)
        self.seed = cfg.train.seed
        self.max_caption = d.max_caption_tokens
        self.sample_posterior = d.sample_latents
        self.P = cfg.model.patches_per_image
        self.datasets = [
            StreamingDataset(
                local=s.path, remote=s.remote, shuffle=d.shuffle,
                shuffle_seed=self.seed + i, batch_size=1, replication=replication if replication > 1 else None,
            )
            for i, s in enumerate(self.streams)
        ]
        shares = np.array([s.proportion for s in self.streams], dtype=np.float64)
        self.shares = shares / shares.sum()
        self.epoch = [0] * len(self.streams)
        self.consumed = [0] * len(self.streams)  # samples this rank took in the current epoch
        self.positions = [0] * len(self.streams)  # sequence positions emitted, for the token mix
        self._iters: list[Any] = [None] * len(self.streams)

    def __iter__(self) -> "StreamingSource":
        return self

    def _start(self, i: int) -> None:
        ds = self.datasets[i]
        world = ds._parallel_rank_world.num_ranks  # ranks reading distinct samples
        state = ds.state_dict(num_samples=self.consumed[i] * world, from_beginning=True)
        state["epoch"] = self.epoch[i]
        ds.load_state_dict(state)
        self._iters[i] = iter(ds)

    def _next_sample(self, i: int) -> dict:
        if self._iters[i] is None:
            self._start(i)
        try:
            return next(self._iters[i])
        except StopIteration:
            self.epoch[i] += 1
            self.consumed[i] = 0
            self._start(i)
            return next(self._iters[i])

    def __next__(self) -> Document:
        i = int(np.argmin([p / s for p, s in zip(self.positions, self.shares)]))
        sample = self._next_sample(i)
        rng = np.random.default_rng([self.seed, i, self.epoch[i], self.consumed[i]])
        self.consumed[i] += 1
        doc = self._document(self.streams[i].kind, sample, rng)
        self.positions[i] += doc.num_positions(self.P)
        return doc

    def _document(self, kind: str, sample: dict, rng: np.random.Generator) -> Document:
        if kind == "text":
            return self.builder.text(np.asarray(sample["tokens"], dtype=np.int64), add_bos_eos=False)
        mean, std = sample_latents(sample)
        if self.sample_posterior:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            latent = draw_latent(mean, std, gen)
        else:
            latent = mean
        caption = np.asarray(sample["caption_ids"], dtype=np.int64)[: self.max_caption]
        return self.builder.image_caption(caption, latent, rng)

    def state_dict(self) -> dict:
        return {"epoch": list(self.epoch), "consumed": list(self.consumed), "positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = list(state["epoch"]), list(state["consumed"])
        self.positions = list(state["positions"])
        self._iters = [None] * len(self.streams)
