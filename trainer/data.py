"""Training-time data: a document source feeding the packer, yielding PackedBatch with exact resume."""

from __future__ import annotations

from typing import Iterator, Protocol

from model.batch import PackedBatch
from config import Config, ModelConfig

from .documents import Document, DocumentBuilder, DocumentRecipe
from .packing import SequencePacker, collate


class ElasticResumeUnsupported(Exception):
    """The state cannot continue on a layout with another number of data-parallel ranks."""


class DocumentSource(Protocol):
    """What the loader needs from a source of documents (trainer/synthetic.py, trainer/streaming.py)."""

    def __iter__(self) -> Iterator[Document]: ...
    def __next__(self) -> Document: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class PackedLoader:
    """Packs documents from `source` into batches of `batch_size` rows."""

    def __init__(self, source: DocumentSource, packer: SequencePacker, batch_size: int, model: ModelConfig) -> None:
        self.source, self.packer, self.batch_size = source, packer, batch_size
        self.latent_shape = (model.latent_channels, model.latent_size, model.latent_size)

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        rows = self.packer.pop_rows(self.batch_size)
        while rows is None:
            self.packer.add(next(self.source))
            rows = self.packer.pop_rows(self.batch_size)
        return collate(rows, self.latent_shape)

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.packer.load_state_dict(state["packer"])

    def load_elastic_state(self, states: list[dict]) -> str:
        """Continue from the loader states of every rank of a layout with another number of
        data-parallel ranks; returns what happened, for the log. The old packers' unfinished rows are
        dropped (their documents were read). Raises ElasticResumeUnsupported for sources without it."""
        if not hasattr(self.source, "load_elastic_state"):
            raise ElasticResumeUnsupported(f"{type(self.source).__name__} cannot continue on another layout")
        report = self.source.load_elastic_state([s["source"] for s in states])
        held = sum(len(s["packer"]["waiting"]) + len(s["packer"]["ready"]) + (s["packer"]["fill"] > 0)
                   for s in states)
        return f"{report}; dropped {held} unfinished rows or waiting images of the old ranks' packers"


def document_builder(cfg: Config) -> DocumentBuilder:
    d = cfg.data
    recipe = DocumentRecipe(
        image_first_prob=d.image_first_prob, caption_dropout=d.caption_dropout,
        image_first_max_t=d.image_first_max_t, num_timesteps=cfg.diffusion.num_timesteps,
    )
    return DocumentBuilder(cfg.model.tokens, recipe)


def build_loader(cfg: Config, rank: int = 0, world_size: int = 1) -> PackedLoader:
    """The training loader for data-parallel rank `rank` of `world_size` (the tensor and pipeline
    ranks of one replica share a data-parallel rank, so they read the same data)."""
    builder = document_builder(cfg)
    if cfg.data.source == "synthetic":
        from .synthetic import SyntheticSource

        source: DocumentSource = SyntheticSource(cfg.data, cfg.model, builder, cfg.train.seed, rank, world_size)
    else:
        from .streaming import StreamingSource

        source = StreamingSource(cfg, builder, rank, world_size)
    packer = SequencePacker(cfg.train.seq_len, cfg.model.patches_per_image, cfg.model.tokens,
                            cfg.data.max_waiting_images, cfg.model.image_attention)
    return PackedLoader(source, packer, cfg.train.batch_size, cfg.model)
