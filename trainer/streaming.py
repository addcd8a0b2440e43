"""Training documents from mosaicml-streaming shards (written by data_prep/), mixed by tokens.

Each configured stream is its own `StreamingDataset` over MDS shards (schema: data_prep/schema.py):
streaming reads the index, downloads and caches shards, and returns samples by id. Which ids a
data-parallel rank reads, in which order, is ours (trainer/sample_order.py): every rank walks its
own contiguous part of a shard-local shuffle of the epoch, with no node-wide coordination, so ranks
may cross epoch boundaries at different steps, and the state is exact and elastic. Streams are
mixed by *tokens*: the next document comes from the stream furthest below its share of the
positions emitted so far, so a 1:1 mix means as many image positions as text positions (the
paper's mix).

Why not StreamingDataset's own iterator and state_dict: its resume state is one global sample
count in node-shared memory, and each new epoch is a barrier across the node's ranks. Token mixing
makes ranks take different numbers of samples from each stream, so the ranks of a node would
overwrite each other's resume point and block at different steps.

Randomness per document (recipe choices, the latent draw) comes from a generator seeded by (seed,
stream, epoch, position in the epoch), so a sample is the same document whichever rank reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from streaming import StreamingDataset

from data_prep.schema import SchemaError, check_index, document_parts, draw_latent, sample_latents
from config import Config, ConfigError, ModelConfig, StreamConfig

from .documents import Document, DocumentBuilder
from .megatron_corpus import MegatronCorpus
from .sample_order import EpochOrder, RankCursor, deal, merge, position_at, segments_length


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
    if stream.kind in ("image", "interleaved") and shape is not None and list(shape) != want:
        raise ConfigError(
            f"data stream '{stream.path}' holds latents of shape {shape} but the model expects {want} "
            "(model.latent_channels, model.latent_size)"
        )
    if stream.kind == "image_tokens":
        check_token_info(stream, info, m)
    vocab = info.get("vocab_size")
    if vocab is not None and vocab > text_vocabulary(m)[0]:
        raise ConfigError(f"data stream '{stream.path}' uses a vocabulary of {vocab} ids but {text_limit(m)}")
    ids = info.get("special_tokens") or {}
    for name, value in vars(m.tokens).items():
        if name in ids and ids[name] != value:
            raise ConfigError(
                f"data stream '{stream.path}' was tokenized with {name}={ids[name]} but model.tokens.{name}={value}"
            )


def text_vocabulary(m: ModelConfig) -> tuple[int, str]:
    """(end, config key) of the text ids: model.vocab_size, or with image tokens the ids below
    model.image_token_offset (the codes above it are images, not text)."""
    if m.image_representation == "tokens":
        return m.image_token_offset, "model.image_token_offset"
    return m.vocab_size, "model.vocab_size"


def text_limit(m: ModelConfig) -> str:
    """The text-vocabulary limit as an error message's tail: 'model.vocab_size=N' or 'text ids lie below ...'."""
    limit, name = text_vocabulary(m)
    return f"{name}={limit}" if name == "model.vocab_size" else f"text ids lie below {name}={limit}"


def check_token_info(stream: StreamConfig, info: dict, m: ModelConfig) -> None:
    """Image-token shards must match the model's codebook, code grid and token offset."""
    codes, grid, vocab = info.get("codebook_size"), info.get("token_grid"), info.get("vocab_size")
    if codes is not None and codes != m.image_codebook_size:
        raise ConfigError(f"data stream '{stream.path}' holds codes of a {codes}-entry codebook but "
                          f"model.image_codebook_size={m.image_codebook_size}")
    if grid is not None and list(grid) != [m.latent_size, m.latent_size]:
        raise ConfigError(f"data stream '{stream.path}' holds {grid[0]}x{grid[1]} codes per image but "
                          f"model.latent_size={m.latent_size}")
    if vocab is not None and vocab > m.image_token_offset:
        raise ConfigError(f"data stream '{stream.path}' has a text vocabulary of {vocab} ids, so image codes must "
                          f"start at model.image_token_offset >= {vocab} (got {m.image_token_offset})")


def open_stream(stream: StreamConfig) -> StreamingDataset:
    """The stream's StreamingDataset, once its index passed data_prep's schema check (one-line refusal).

    A local index is checked before streaming opens it; a remote stream's index once streaming has
    put it in the local cache, before any sample is read.
    """
    index = Path(stream.path) / "index.json"
    checked = index.is_file()
    if checked:
        _check_schema(index, stream.kind)
    try:
        dataset = StreamingDataset(local=stream.path, remote=stream.remote, shuffle=False, batch_size=1)
    except Exception:
        if not checked and index.is_file():  # fetched, then refused by streaming: say why in our terms
            _check_schema(index, stream.kind)
        raise
    if not checked:
        _check_schema(index, stream.kind)
    return dataset


def _check_schema(index: Path, kind: str) -> None:
    try:
        check_index(index, kind)
    except SchemaError as e:
        raise ConfigError(str(e)) from None  # names the shard set and the column


class StreamingSource:
    """Iterator over Documents from several MDS streams, mixed by tokens; exact, elastic resume."""

    def __init__(self, cfg: Config, builder: DocumentBuilder, rank: int = 0, world: int = 1) -> None:
        d = cfg.data
        self.cfg, self.builder, self.rank, self.world = cfg, builder, rank, world
        self.streams = d.streams
        for s in self.streams:
            if s.kind != "megatron":
                check_dataset_info(s, cfg)
        self.seed = cfg.train.seed
        self.max_caption = d.max_caption_tokens
        self.sample_posterior = d.sample_latents
        self.P = cfg.model.patches_per_image
        self.text_end = text_vocabulary(cfg.model)[0]  # text shards' ids are checked per sample (cheap)
        self.datasets = [self._open(s) for s in self.streams]
        for s, ds in zip(self.streams, self.datasets):
            if ds.num_samples < world:
                raise ConfigError(f"data stream '{s.path}' has {ds.num_samples} samples, fewer than the {world} "
                                  "data-parallel ranks that share it")
        shares = np.array([s.proportion for s in self.streams], dtype=np.float64)
        self.shares = shares / shares.sum()
        self.cursors = [RankCursor(0, deal([[0, ds.num_samples]], world, rank)) for ds in self.datasets]
        self.positions = [0] * len(self.streams)  # sequence positions emitted, for the token mix
        self._orders: list[EpochOrder | None] = [None] * len(self.streams)

    def __iter__(self) -> "StreamingSource":
        return self

    def _open(self, stream: StreamConfig) -> StreamingDataset | MegatronCorpus:
        if stream.kind == "megatron":
            m = self.cfg.model
            return MegatronCorpus(stream.path, *text_vocabulary(m), m.tokens.bos, m.tokens.eos, stream.add_bos,
                                  stream.add_eos, stream.eod)
        return open_stream(stream)

    def _order(self, i: int) -> EpochOrder:
        epoch = self.cursors[i].epoch
        if self._orders[i] is None or self._orders[i].epoch != epoch:
            ds, d = self.datasets[i], self.cfg.data
            self._orders[i] = EpochOrder(ds.samples_per_shard, self.seed + i, epoch, d.shuffle, d.shuffle_block)
        return self._orders[i]

    def _next_sample(self, i: int) -> tuple[dict, int, int]:
        """The next sample of stream i for this rank, with its (epoch, position)."""
        cur = self.cursors[i]
        while cur.taken >= segments_length(cur.part):  # part done: this rank's share of the next epoch
            n = self.datasets[i].num_samples
            cur.epoch, cur.part, cur.taken = cur.epoch + 1, deal([[0, n]], self.world, self.rank), 0
        pos = position_at(cur.part, cur.taken)
        cur.taken += 1
        return self.datasets[i][self._order(i).sample_id(pos)], cur.epoch, pos

    def __next__(self) -> Document:
        doc = None
        while doc is None:  # None: an empty Megatron document, skipped
            i = int(np.argmin([p / s for p, s in zip(self.positions, self.shares)]))
            sample, epoch, pos = self._next_sample(i)
            rng = np.random.default_rng([self.seed, i, epoch, pos])
            doc = self._document(self.streams[i], sample, rng)
        self.positions[i] += doc.num_positions(self.P)
        return doc

    def _document(self, stream: StreamConfig, sample: dict, rng: np.random.Generator) -> Document | None:
        kind = stream.kind
        if kind in ("text", "megatron"):
            if sample["tokens"] is None:
                return None
            tokens = np.asarray(sample["tokens"], dtype=np.int64)
            if kind == "text":
                self._check_ids(stream, f"sample {sample['key']}", tokens)
            return self.builder.text(tokens, add_bos_eos=False)
        if kind == "image_tokens":  # discrete baseline: BOI + offset codes + EOI, LM loss only
            caption = np.asarray(sample["caption_ids"], dtype=np.int64)[: self.max_caption]
            codes = np.asarray(sample["image_tokens"], dtype=np.int64) + self.cfg.model.image_token_offset
            return self.builder.image_tokens_caption(caption, codes, rng)
        if kind == "interleaved":
            return self.builder.interleaved(self._parts(stream, sample, rng), stream.recipe, rng)
        latent = self._latent(*sample_latents(sample), rng)
        caption = np.asarray(sample["caption_ids"], dtype=np.int64)[: self.max_caption]
        return self.builder.image_caption(caption, latent, rng)

    def _check_ids(self, stream: StreamConfig, what: str, ids: np.ndarray) -> np.ndarray:
        """`ids` if they lie in the text vocabulary, else a one-line ConfigError naming the sample."""
        if ids.size and (ids.max() >= self.text_end or ids.min() < 0):
            bad = int(ids.max()) if ids.max() >= self.text_end else int(ids.min())
            raise ConfigError(f"data stream '{stream.path}' {what} holds token id {bad} but {text_limit(self.cfg.model)}")
        return ids

    def _latent(self, mean: torch.Tensor, std: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The image's latent: a draw from its stored posterior (data.sample_latents), else the mean."""
        if not self.sample_posterior:
            return mean
        return draw_latent(mean, std, torch.Generator().manual_seed(int(rng.integers(2**62))))

    def _parts(self, stream: StreamConfig, sample: dict, rng: np.random.Generator) -> list[tuple]:
        """A document row's parts, (role, ids) or (role, latent), checked against the model (one line)."""
        try:
            parts = document_parts(sample)
        except ValueError as e:
            raise ConfigError(f"data stream '{stream.path}': {e}") from None
        m, out = self.cfg.model, []
        want = (m.latent_channels, m.latent_size, m.latent_size)
        for role, *value in parts:
            if len(value) == 1:
                out.append((role, self._check_ids(stream, f"document {sample['key']}", value[0])))
                continue
            mean, std = value
            if tuple(mean.shape) != want:
                raise ConfigError(f"data stream '{stream.path}' document {sample['key']} holds a latent of shape "
                                  f"{list(mean.shape)} but the model expects {list(want)} (model.latent_channels, "
                                  "model.latent_size)")
            out.append((role, self._latent(mean, std, rng)))
        return out

    def state_dict(self) -> dict:
        return {"streams": [c.state_dict() for c in self.cursors], "positions": list(self.positions),
                "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if "streams" not in state or len(state["streams"]) != len(self.streams):
            raise ConfigError(f"the saved data state does not match data.streams ({len(self.streams)} streams); "
                              "resume with the streams the run was saved with, or checkpoint.resume=none")
        self.cursors = [RankCursor.from_state(s) for s in state["streams"]]
        self.positions = list(state["positions"])

    def load_elastic_state(self, states: list[dict]) -> str:
        """Continue from the states of all ranks of a layout with another number of data-parallel
        ranks (in rank order); returns a summary for the log."""
        report = []
        for i in range(len(self.streams)):
            self.cursors[i], repeated = merge([RankCursor.from_state(s["streams"][i]) for s in states],
                                              self.world, self.rank)
            report.append(f"{self.streams[i].kind} stream: {segments_length(self.cursors[i].part)} samples of "
                          f"epoch {self.cursors[i].epoch} left for this rank, {repeated} to be read again")
        self.positions = [sum(s["positions"][i] for s in states) // len(states) for i in range(len(self.streams))]
        return "; ".join(report)
