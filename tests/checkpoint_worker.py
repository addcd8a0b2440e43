"""Save/resume jobs for spawned gloo ranks (see test_checkpoint_layouts.py, test_deepspeed_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from tests.parallel_worker import global_batches
from trainer.checkpoint import Checkpointer, load_checkpoint
from trainer.train import Trainer


def train_with_checkpoints(cfg, env, out: str, save_at: int | None, resume: str | None) -> dict:
    """Train cfg.train.steps over the global batches, saving at step `save_at` into `out` (0: before
    training) and/or first resuming from the checkpoint folder `resume`; returns the losses and, for
    the DeepSpeed engine, the full weights at the save."""
    trainer = Trainer(cfg, env)
    dp, dp_rank = (env.dims.dp, env.dp_rank) if env is not None else (1, 0)
    if resume is not None:
        state, _ = load_checkpoint(Path(resume), trainer.pm.parts, trainer.optimizer, cfg.to_dict(), trainer.engine)
        trainer.load_train_state(state)
    checkpointer = Checkpointer(Path(out), keep_last=5)
    result: dict = {"losses": []}

    def save() -> None:
        checkpointer.save(trainer.step, trainer.pm.parts, trainer.optimizer, trainer.train_state(), {}, trainer.engine)
        if trainer.engine is not None:
            from parallel.deepspeed_engine import full_state_dict

            result["saved_params"] = full_state_dict(trainer.engine)

    if save_at == 0:
        save()
    per_rank = cfg.train.grad_accum
    for step_batches in global_batches(cfg, dp)[trainer.step :]:
        result["losses"].append(trainer.train_step(step_batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]).loss)
        if trainer.step == save_at:
            save()
    return result
