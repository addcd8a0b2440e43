"""Spawned gloo ranks that save and resume checkpoints in a given layout (see test_checkpoint_layouts.py)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims, init_distributed
from tests.parallel_worker import global_batches, layout_config
from trainer.checkpoint import Checkpointer, load_checkpoint
from trainer.train import Trainer


def train_with_checkpoints(cfg, env, out: Path, save_at: int | None, resume: Path | None) -> list[float]:
    """Train cfg.train.steps over the global batches, saving at `save_at` / resuming from `resume`."""
    trainer = Trainer(cfg, env)
    dp, dp_rank = (env.dims.dp, env.dp_rank) if env is not None else (1, 0)
    if resume is not None:
        state, _ = load_checkpoint(resume, trainer.pm.parts, trainer.optimizer, cfg.to_dict())
        trainer.load_train_state(state)
    checkpointer = Checkpointer(out, keep_last=5)
    if save_at == 0:
        checkpointer.save(0, trainer.pm.parts, trainer.optimizer, trainer.train_state(), {})
    per_rank = cfg.train.grad_accum
    losses = []
    for step_batches in global_batches(cfg, dp)[trainer.step :]:
        losses.append(trainer.train_step(step_batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]).loss)
        if trainer.step == save_at:
            checkpointer.save(trainer.step, trainer.pm.parts, trainer.optimizer, trainer.train_state(), {})
    return losses


def worker(rank: int, world: int, port: int, jobs: list[tuple], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, overrides, save_at, resume in jobs:
        try:
            cfg = layout_config(overrides)
            cfg.parallel = cfg.parallel.resolved(world)
            env = init_distributed(ParallelDims.from_config(cfg.parallel), device_type="cpu")
            losses = train_with_checkpoints(cfg, env, Path(out) / name, save_at, resume and Path(resume))
            result = {"losses": losses}
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, Path(out) / f"{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()
