"""Single-process training entry point: `python -m trainer.train --config configs/tiny.yaml [k=v ...]`.

One step = grad_accum micro-batches of packed rows -> L_LM + lambda * L_DDPM -> clip -> AdamW ->
LR schedule. Diffusion noise for each micro-batch comes from a generator seeded by (seed, step,
micro-batch), so a run is reproducible from its config alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from model import NoiseSchedule, PackedBatch, TransfusionModel, training_forward
from model.config_base import ConfigError

from .checkpoint import save_checkpoint
from .config import Config, load_config
from .data import build_loader
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("trainer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def noise_generator(device: torch.device, seed: int, step: int, micro: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, micro-batch): resumable noise."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 1009 + micro)
    return gen


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    diffusion_loss: float
    grad_norm: float
    lr: float
    tokens: int


class Trainer:
    """Owns the model, optimizer, schedule and noise schedule; `train_step` runs one step."""

    def __init__(self, cfg: Config, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.model = TransfusionModel(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.step = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batches: list[PackedBatch]) -> StepResult:
        """One optimizer step over `batches` (one per micro-batch)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        totals = torch.zeros(3, device=self.device)
        tokens = 0
        for micro, batch in enumerate(batches):
            batch = batch.to(self.device)
            gen = noise_generator(self.device, self.cfg.train.seed, self.step, micro)
            with self.autocast():
                losses = training_forward(self.model, self.schedule, batch, self.cfg.diffusion.loss_weight, gen)
            (losses.total / len(batches)).backward()
            totals += torch.stack([losses.total, losses.lm, losses.diffusion]).detach() / len(batches)
            tokens += batch.tokens.numel()
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss, lm, diff = totals.tolist()
        return StepResult(loss, lm, diff, float(grad_norm), lr, tokens)

    def train_state(self, loader_state: dict) -> dict:
        return {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "loader": loader_state,
            "config": self.cfg.to_dict(),
        }


def _micro_batches(loader: Iterator[PackedBatch], n: int) -> list[PackedBatch]:
    return [next(loader) for _ in range(n)]


def train(cfg: Config) -> list[dict[str, float]]:
    """Run the configured training; returns the per-step metrics."""
    trainer = Trainer(cfg)
    loader = build_loader(cfg)
    out = cfg.output_dir
    logger = MetricsLogger(cfg.logging, out, cfg.to_dict())
    n_params = trainer.model.num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters on {trainer.device}; training {cfg.train.steps} steps")
    history: list[dict[str, float]] = []
    ckpt_root = out / "checkpoints"
    last_ckpt: Path | None = None
    try:
        while trainer.step < cfg.train.steps:
            t0 = time.perf_counter()
            result = trainer.train_step(_micro_batches(loader, cfg.train.grad_accum))
            dt = time.perf_counter() - t0
            metrics = {
                "loss": result.loss, "lm_loss": result.lm_loss, "diffusion_loss": result.diffusion_loss,
                "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": result.tokens / dt,
            }
            history.append(metrics)
            step = trainer.step
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                logger.log(step, metrics)
            ck = cfg.checkpoint
            if ck.enabled and ((ck.interval and step % ck.interval == 0) or step == cfg.train.steps):
                last_ckpt = save_checkpoint(
                    ckpt_root, step, trainer.model, trainer.optimizer,
                    trainer.train_state(loader.state_dict()), ck.keep_last,
                )
    finally:
        run_dir = logger.run_dir
        logger.close()
    print(f"done: {trainer.step} steps; outputs in {out}")
    if last_ckpt is not None:
        print(f"checkpoint: {last_ckpt}")
    if run_dir is not None:
        print(f"wandb run: {run_dir}")
    return history


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config under configs/")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    try:
        cfg = load_config(args.config, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise ConfigError(
                f"launched with WORLD_SIZE={world_size}, but multi-process layouts are not built yet "
                "(issue 5, parallel/); run one process"
            )
        cfg.parallel = cfg.parallel.resolved(world_size)
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
