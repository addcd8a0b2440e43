"""Parallel layout config: device-mesh dims, how they are applied, and the DeepSpeed engine's options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .base import require
from .model import ModelConfig

@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO engine (pure data parallel); a user JSON may override the generated config."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    config_json: str | None = None


@dataclass
class ParallelConfig:
    """Device mesh dims (their product must equal the number of processes) and how to apply them."""

    dp_replicate: int = 1
    dp_shard: int = 1  # -1 = whatever the world size leaves after the other dims
    tp: int = 1
    pp: int = 1
    engine: Literal["torch", "deepspeed"] = "torch"
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_virtual_stages: int = 2  # stages per rank for the interleaved / zero-bubble schedules
    reshard_after_forward: bool = True  # True: ZeRO-3; False: ZeRO-2-like
    # FSDP gradient reduce-scatter with grad_accum > 1 (no pipeline): on the step's last micro-batch only
    # (less traffic; every rank keeps unsharded fp32 gradient accumulators between micro-batches), or after
    # every micro-batch (grad_accum x the reduce-scatters; gradients stay sharded). See docs/parallelism.md.
    grad_sync: Literal["last_micro_batch", "every_micro_batch"] = "last_micro_batch"
    cpu_offload: bool = False
    activation_checkpoint: Literal["none", "full", "every_k"] = "none"
    activation_checkpoint_every: int = 2
    compile: bool = False
    meta_init: bool = False  # build the model on the meta device, materialise only local shards
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def resolved(self, world_size: int) -> "ParallelConfig":
        """Concrete dims for `world_size` processes (fills dp_shard=-1); errors name the mismatch."""
        others = self.dp_replicate * self.tp * self.pp
        shard = self.dp_shard
        if shard == -1:
            require(
                world_size % others == 0,
                f"world size {world_size} is not divisible by dp_replicate*tp*pp={others}",
            )
            shard = world_size // others
        dims = dataclasses.replace(self, dp_shard=shard)
        require(
            others * shard == world_size,
            f"world size {world_size} != dp_replicate*dp_shard*tp*pp = "
            f"{self.dp_replicate}*{shard}*{self.tp}*{self.pp}",
        )
        return dims

    def validate(self, m: ModelConfig, seq_len: int, grad_accum: int) -> None:
        """Checks of the layout against the model and the step (dims, divisibility, pipeline depth)."""
        for name in ("dp_replicate", "tp", "pp"):
            require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        require(self.dp_shard >= 1 or self.dp_shard == -1, f"parallel.dp_shard must be >= 1 or -1, got {self.dp_shard}")
        require(m.n_heads % self.tp == 0, f"parallel.tp={self.tp} does not divide model.n_heads={m.n_heads}")
        require(m.kv_heads % self.tp == 0, f"parallel.tp={self.tp} does not divide model.n_kv_heads={m.kv_heads}")
        require(m.vocab_size % self.tp == 0, f"parallel.tp={self.tp} does not divide model.vocab_size={m.vocab_size}")
        require(seq_len % self.tp == 0, f"parallel.tp={self.tp} does not divide train.seq_len={seq_len} (sequence parallel)")
        multi = self.pp_schedule in ("interleaved_1f1b", "zero_bubble")
        n_stages = self.pp * (self.pp_virtual_stages if multi and self.pp > 1 else 1)
        require(
            n_stages <= m.n_layers,
            f"parallel.pp={self.pp} x {n_stages // self.pp} stages per rank exceeds model.n_layers={m.n_layers}",
        )
        if self.pp > 1:
            require(
                grad_accum >= self.pp and (not multi or grad_accum % self.pp == 0),
                f"parallel.pp={self.pp} needs train.grad_accum (the pipeline's micro-batches) >= {self.pp}"
                + (f" and a multiple of {self.pp}" if multi else "") + f", got {grad_accum}",
            )
        if self.engine == "deepspeed":
            require(
                self.tp == 1 and self.pp == 1,
                f"parallel.engine=deepspeed runs ZeRO data parallelism only, which does not compose with "
                f"tensor or pipeline parallelism; set parallel.tp=1 and parallel.pp=1 (got tp={self.tp}, "
                f"pp={self.pp}) or use parallel.engine=torch",
            )
        require(self.activation_checkpoint_every >= 1, "parallel.activation_checkpoint_every must be >= 1")

