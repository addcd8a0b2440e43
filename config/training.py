"""Training run sections: the step, the optimizer, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

@dataclass
class TrainSection:
    steps: int = 250_000
    seq_len: int = 4096
    batch_size: int = 1  # rows per micro-batch (per data-parallel rank)
    grad_accum: int = 1
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "bf16"  # bf16 = autocast with fp32 master weights
    ema_decay: float = 0.0  # EMA of the weights after every optimizer step (parallel/ema.py); 0: off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "outputs/run"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 4000
    decay_steps: int | None = None  # cosine reaches min_lr here; None = train.steps
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps between saves; 0 = only at the end
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    enabled: bool = True
    resume: str = "auto"  # auto (latest in <output_dir>/checkpoints, if any) | none | a checkpoint path
    async_save: bool = False  # overlap the write with training (DCP async_save)
    max_bad_steps: int = 5  # consecutive non-finite steps (skipped) before saving and stopping; deepspeed stops at 1
    # Start from these weights only (fresh optimizer, schedule and data): a training checkpoint step
    # folder, an inference folder or a Hugging Face Llama folder. A checkpoint of the run's own wins.
    init_from: str | None = None
    init_fresh: list[str] = field(default_factory=list)  # fnmatch patterns of weights allowed to start fresh


@dataclass
class LoggingConfig:
    log_every: int = 1
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "transfusion"
    run_name: str | None = None
