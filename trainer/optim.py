"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from config import OptimConfig


def build_optimizer_for(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; norms, biases and other 1-D parameters get no weight decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup to lr, then cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or total_steps
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_at` (its state is just the step, so it checkpoints trivially)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)


class AdamWCosine:
    """The engines' OptimizerFactory: AdamW (decay on matrices only) with warmup + cosine LambdaLR."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.cfg, self.total_steps = cfg, total_steps

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.AdamW:
        return build_optimizer_for(params, self.cfg)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(optimizer, self.cfg, self.total_steps)
