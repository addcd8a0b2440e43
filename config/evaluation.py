"""Held-out evaluation during training: how often, on what, at what budget (trainer/evaluation.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import require
from .data import DataConfig, StreamConfig, validate_streams
from .model import ModelConfig


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations (and one at the last step); 0: off
    rows: int = 64  # the budget: packed rows of train.seq_len per evaluation, the same rows every time
    # Held-out shards, written like data.streams and read with them (data.source=streaming); with
    # data.source=synthetic, the synthetic source's own held-out documents instead.
    streams: list[StreamConfig] = field(default_factory=list)
    timestep_buckets: int = 8  # diffusion loss at fixed timesteps, one stratum per equal range of [0, T)
    seed: int = 0  # held-out noise and timesteps (not train.seed: runs of any seed compare on the same draws)
    lm: bool = True  # LM loss and perplexity per text token, plain text and captions apart
    diffusion: bool = True  # diffusion loss per timestep bucket and their mean
    weights: Literal["raw", "ema", "both"] = "raw"  # which weights to score: ema needs train.ema_decay (eval/ema/...)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def validate(self, data: DataConfig, m: ModelConfig, num_timesteps: int) -> None:
        require(self.every >= 0, f"eval.every must be >= 0 (0: off), got {self.every}")
        require(self.rows >= 1, f"eval.rows must be >= 1, got {self.rows}")
        require(1 <= self.timestep_buckets <= num_timesteps, f"eval.timestep_buckets={self.timestep_buckets} "
                f"must lie in [1, diffusion.num_timesteps={num_timesteps}]")
        require(self.lm or self.diffusion, "eval.lm and eval.diffusion are both false: nothing to evaluate "
                "(set eval.every=0 to turn evaluation off)")
        if data.source != "streaming" or not self.enabled:  # streams unread, like data.streams when synthetic
            return
        require(bool(self.streams), f"eval.every={self.every} with data.source=streaming needs eval.streams: "
                "held-out shards that are not in data.streams (or eval.every=0)")
        validate_streams(self.streams, "eval.streams", m)
        for i, held in enumerate(self.streams):
            for j, trained in enumerate(data.streams):
                require(not _same_data(held, trained), f"eval.streams[{i}] ('{held.remote or held.path}') holds "
                        f"data.streams[{j}]'s shards ('{trained.remote or trained.path}'): held-out data must "
                        "not be trained on; point it at a separate held-out split")


def _same_data(a: StreamConfig, b: StreamConfig) -> bool:
    """Whether two streams read the same shards: the same remote, or local folders one inside the other."""
    if a.remote is not None or b.remote is not None:
        if a.remote is not None and b.remote is not None:
            ra, rb = a.remote.rstrip("/") + "/", b.remote.rstrip("/") + "/"
            return ra.startswith(rb) or rb.startswith(ra)
    pa, pb = Path(a.path).resolve(), Path(b.path).resolve()
    if "megatron" in (a.kind, b.kind):  # a .bin/.idx prefix, not a folder
        return pa == pb
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)
