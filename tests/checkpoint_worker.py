"""Save/resume jobs for spawned gloo ranks (see test_checkpoint_layouts.py, test_deepspeed_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import checkpoint_manager
from tests.parallel_worker import global_batches
from trainer.train import make_engine


def train_with_checkpoints(cfg, env, out: str, save_at: int | None, resume: str | None) -> dict:
    """Train cfg.train.steps over the global batches, saving at step `save_at` into `out` (0: before
    training) and/or first resuming from the checkpoint folder `resume`; returns the losses and, for
    the DeepSpeed engine, the full weights at the save, and with train.ema_decay the EMA at the end."""
    engine = make_engine(cfg, env)
    dp, dp_rank = (env.dims.dp, env.dp_rank) if env is not None else (1, 0)
    step = 0
    if resume is not None:  # read as its own run resumes it (inside its root: no trust warning)
        reader, loaded = checkpoint_manager(cfg, engine, Path(resume).parent)
        reader.load(Path(resume))
        step = loaded.step
    ckpt, state = checkpoint_manager(cfg, engine, Path(out), step=step, keep_last=5)
    result: dict = {"losses": []}

    def save() -> None:
        ckpt.save(state.step)
        if cfg.parallel.engine == "deepspeed":
            result["saved_params"] = engine.full_state_dict()

    if save_at == 0:
        save()
    per_rank = cfg.train.grad_accum
    for step_batches in global_batches(cfg, dp)[state.step :]:
        result["losses"].append(engine.train_step(step_batches[dp_rank * per_rank : (dp_rank + 1) * per_rank],
                                                  state.step).loss)
        state.step += 1
        if state.step == save_at:
            save()
    if engine.ema is not None:
        result["ema"] = {n: t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
                         for n, t in engine.ema.state_dict().items()}
    return result
