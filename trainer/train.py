"""Training entry point: `[torchrun --nproc-per-node N -m] python -m trainer.train --config configs/tiny.yaml [k=v ...]`.

One step = grad_accum micro-batches of packed rows -> L_LM + lambda * L_DDPM -> clip -> AdamW ->
LR schedule. Diffusion noise for each micro-batch comes from a generator seeded by (seed, step,
micro-batch), so a run is reproducible from its config alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from model import LossNorm, ModelOutput, NoiseSchedule, PackedBatch, TransfusionModel, transfusion_loss
from config import Config, ConfigError, load_config
from parallel.dims import DistEnv, ParallelDims, init_distributed
from parallel.grad_clip import clip_grad_norm
from parallel.parallelize import ParallelModel, parallelize
from parallel.plan_flops import step_model_flops
from parallel.plan_hardware import gpu_for_device_name

from .checkpoint import Checkpointer, UnsafeToSave, data_parallel_states, resume_checkpoint
from .data import build_loader
from .metrics import MetricsLogger, window_summary
from .optim import build_optimizer_for, build_scheduler
from .preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionWatcher, TrainingDiverged
from .redact import redact

log = logging.getLogger("trainer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def noise_generator(device: torch.device, seed: int, step: int, micro: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, global micro-batch): resumable noise,
    and the same noise for a micro-batch whichever data-parallel rank processes it."""
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
    skipped: bool = False  # a non-finite loss or gradient: no update was made


def image_capacity(cfg: Config) -> int:
    """Most images one micro-batch can hold (pipeline buffers are sized for it)."""
    return cfg.train.batch_size * (cfg.train.seq_len // (cfg.model.patches_per_image + 2))


class Trainer:
    """Owns the (parallelised) model, optimizer and schedules; `train_step` runs one step."""

    def __init__(self, cfg: Config, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        p = cfg.parallel
        self.env = env or DistEnv(ParallelDims(), None, resolve_device(cfg.train.device), 0, 0)
        self.device = self.env.device
        torch.manual_seed(cfg.train.seed)
        with torch.device("meta") if p.meta_init else contextlib.nullcontext():
            model = TransfusionModel(cfg.model)
        self.schedule = NoiseSchedule(cfg.diffusion)
        self._pp_losses: list[torch.Tensor] = []
        self._norm: LossNorm | None = None  # this step's loss denominators (see train_step)
        self.engine = None  # a DeepSpeedEngine when parallel.engine=deepspeed
        if p.engine == "deepspeed":
            self._init_deepspeed(model)
        else:
            self.pm = parallelize(
                model, self.env, p, cfg.train.dtype, cfg.train.grad_accum, image_capacity(cfg), self._pipeline_loss
            )
            self.model = self.pm.parts[0]
            self.optimizer = build_optimizer_for(list(self.pm.parameters()), cfg.optim)
            self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.step = 0

    def _init_deepspeed(self, model: TransfusionModel) -> None:
        """DeepSpeed ZeRO engine over the plain model (pure data parallel; tp = pp = 1 is validated)."""
        from parallel.activation import apply_activation_checkpointing, apply_compile
        from parallel.deepspeed_engine import build_engine

        p = self.cfg.parallel
        apply_activation_checkpointing(model, p.activation_checkpoint, p.activation_checkpoint_every)
        if p.compile:
            apply_compile(model)
        self.engine, self.scheduler = build_engine(model, self.cfg, self.device)
        self.model = self.engine.module
        self.pm = ParallelModel([self.model])
        self.optimizer = self.engine.optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.pm.loss_parallel else contextlib.nullcontext()

    def _pipeline_loss(self, outputs: tuple[torch.Tensor, ...], text_targets: torch.Tensor) -> torch.Tensor:
        logits, noise_pred, noise = outputs
        losses = transfusion_loss(
            ModelOutput(logits, noise_pred), text_targets, noise, self.cfg.diffusion.loss_weight, self._norm
        )
        self._pp_losses.append(torch.stack([losses.total, losses.lm, losses.diffusion]).detach())
        return losses.total * self.env.dims.dp  # summed over micro-batches (scale_grads=False)

    def _noised(self, batch: PackedBatch, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        global_micro = self.env.dp_rank * self.cfg.train.grad_accum + micro
        gen = noise_generator(self.device, self.cfg.train.seed, self.step, global_micro)
        return self.schedule.sample_training_inputs(batch.latents, batch.image_max_t, gen)

    def _step_norm(self, batches: list[PackedBatch]) -> LossNorm:
        """The step's text targets and images over all micro-batches and data-parallel ranks."""
        counts = torch.tensor([sum(b.num_text_tokens() for b in batches), sum(b.num_images for b in batches)],
                              dtype=torch.int64, device=self.device)
        if self.env.dims.dp > 1:
            dist.all_reduce(counts, group=self.env.group("dp"))
        return LossNorm(*counts.tolist())

    def train_step(self, batches: list[PackedBatch]) -> StepResult:
        """One optimizer step over `batches` (this rank's micro-batches).

        The loss is the step's mean over every text target and every image of all micro-batches and
        data-parallel ranks (not a mean of per-micro-batch means). Data-parallel gradient reduction
        averages over ranks, so each rank back-propagates dp x its share.
        """
        batches = [b.to(self.device) for b in batches]
        self._norm = self._step_norm(batches)
        if self.engine is not None:
            return self._deepspeed_step(batches)
        self.pm.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with self._loss_context():
            totals = self._pipeline_step(batches) if self.pm.schedule else self._plain_step(batches)
        tokens = sum(b.tokens.numel() for b in batches)
        grad_norm = clip_grad_norm(
            self.pm.parameters(), self.cfg.optim.grad_clip or float("inf"),
            self.env.group("pp") if self.env.dims.pp > 1 else None,
        )
        if self.env.dims.dp > 1:
            dist.all_reduce(totals, group=self.env.group("dp"))
        # The grad norm and the losses are global, so every rank takes the same decision.
        finite = bool(torch.isfinite(totals).all()) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
        loss, lm, diff = totals.tolist()
        return StepResult(loss, lm, diff, float(grad_norm), lr, tokens, skipped=not finite)

    def _plain_step(self, batches: list[PackedBatch]) -> torch.Tensor:
        totals = torch.zeros(3, device=self.device)
        for micro, batch in enumerate(batches):
            self.pm.set_gradient_sync(micro == len(batches) - 1)
            noisy, t, noise = self._noised(batch, micro)
            with self.autocast():
                out = self.model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
                losses = transfusion_loss(out, batch.text_targets, noise, self.cfg.diffusion.loss_weight, self._norm)
            (losses.total * self.env.dims.dp).backward()
            totals += torch.stack([losses.total, losses.lm, losses.diffusion]).detach()
        return totals

    def _deepspeed_step(self, batches: list[PackedBatch]) -> StepResult:
        """One step through the DeepSpeed engine: it scales each micro-batch loss by 1/grad_accum
        (undone here), averages gradients over dp, clips, and runs our AdamW + LR schedule at the
        last micro-batch."""
        from parallel.deepspeed_engine import grad_norm

        engine = self.engine
        if len(batches) != engine.gradient_accumulation_steps():
            raise ValueError(
                f"DeepSpeed expects {engine.gradient_accumulation_steps()} micro-batches per step, got {len(batches)}"
            )
        engine.train()
        lr = self.scheduler.get_last_lr()[0]
        totals = torch.zeros(3, device=self.device)
        for micro, batch in enumerate(batches):
            noisy, t, noise = self._noised(batch, micro)
            with self.autocast():
                out = engine(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
                losses = transfusion_loss(out, batch.text_targets, noise, self.cfg.diffusion.loss_weight, self._norm)
            engine.backward(losses.total * (self.env.dims.dp * len(batches)))
            engine.step()  # optimizer + LR schedule only at the accumulation boundary
            totals += torch.stack([losses.total, losses.lm, losses.diffusion]).detach().float()
        self.step += 1
        if self.env.dims.dp > 1:
            dist.all_reduce(totals, group=self.env.group("dp"))
        loss, lm, diff = totals.tolist()
        norm = grad_norm(engine)
        if not (torch.isfinite(totals).all() and math.isfinite(norm)):
            # DeepSpeed has already applied the update (it skips only fp16 overflows), so the
            # weights are suspect: stop without saving them.
            raise TrainingDiverged(
                f"non-finite loss {loss} or grad norm {norm} at step {self.step} under parallel.engine=deepspeed, "
                "which cannot skip the update; nothing was saved. Resume from the last checkpoint with a lower "
                "optim.lr, or check the data"
            )
        return StepResult(loss, lm, diff, norm, lr, sum(b.tokens.numel() for b in batches))

    def _pipeline_step(self, batches: list[PackedBatch]) -> torch.Tensor:
        kwarg_mbs, target_mbs = [], []
        for micro, batch in enumerate(batches):
            noisy, t, noise = self._noised(batch, micro)
            kwarg_mbs.append({
                "position_ids": batch.position_ids, "kv_lo": batch.kv_lo, "kv_hi": batch.kv_hi,
                "is_image": batch.is_image, "noisy_latents": noisy, "timesteps": t, "noise": noise,
            })
            target_mbs.append(batch.text_targets)
        self._pp_losses.clear()
        first = any(part.is_first for part in self.pm.parts)
        with self.autocast():
            self.pm.schedule.step(
                arg_mbs=[(b.tokens,) for b in batches] if first else None, kwarg_mbs=kwarg_mbs,
                target_mbs=target_mbs if self.pm.has_last_stage else None, return_outputs=False,
            )
        totals = torch.zeros(3, device=self.device)
        # Stage set-up on the first step also calls the loss function (shape inference): keep the real ones.
        for losses in self._pp_losses[-len(batches):]:
            totals += losses.float()
        # Only the last stage computed the losses; share them with the other stages.
        dist.all_reduce(totals, group=self.env.group("pp"))
        return totals

    def train_state(self, **extra: object) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": redact(self.cfg.to_dict()),
                **extra}

    def load_train_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The next step's lr comes from the optimizer's groups, which a DeepSpeed load does not set.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


def _micro_batches(loader: Iterator[PackedBatch], n: int) -> list[PackedBatch]:
    return [next(loader) for _ in range(n)]


def train(cfg: Config) -> list[dict[str, float]]:
    """Run the configured training on this process's share of the layout; returns per-step metrics.

    Resumes from `checkpoint.resume`, saves every `checkpoint.interval` steps, and on SIGUSR1 or
    SIGTERM finishes the step, saves and exits with REQUEUE_EXIT_CODE (see slurm/).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = cfg.parallel = cfg.parallel.resolved(world)
    device_type = None if cfg.train.device == "auto" else cfg.train.device
    env = init_distributed(ParallelDims.from_config(p), device_type=device_type)
    trainer = Trainer(cfg, env)
    loader = build_loader(cfg, env.dp_rank, env.dims.dp)
    out, ck = cfg.output_dir, cfg.checkpoint
    checkpointer = Checkpointer(out / "checkpoints", ck.keep_last, ck.keep_every, ck.async_save)
    wandb_id, tokens_seen, resume_from = None, 0, None
    config = redact(cfg.to_dict())  # what checkpoints and wandb hold (no secrets)
    resumed = resume_checkpoint(ck.resume, out / "checkpoints", trainer.pm.parts, trainer.optimizer, config,
                                trainer.engine)
    if resumed is not None:
        resume_from, state, rank_state = resumed
        trainer.load_train_state(state)
        wandb_id = state.get("wandb_id")
        tokens_seen = int(state.get("tokens_seen", 0))
        if rank_state.get("dp") == (env.dp_rank, env.dims.dp):
            loader.load_state_dict(rank_state["loader"])
        else:
            old = data_parallel_states(resume_from)
            try:
                report = loader.load_elastic_state([s["loader"] for s in old])
                if env.is_main:
                    print(f"data-parallel ranks {len(old)} -> {env.dims.dp}: the data continues ({report})")
            except NotImplementedError as e:
                log.warning("data-parallel size changed since %s: the data order restarts (%s)", resume_from, e)
    logger = MetricsLogger(cfg.logging, out, config, enabled=env.is_main, resume_id=wandb_id)
    if env.is_main:
        n = f"{trainer.model.num_params() / 1e6:.2f}M parameters " if env.dims.world_size == 1 else ""
        start = f"resuming at step {trainer.step} from {resume_from}" if resume_from else "starting"
        print(f"model: {n}on {env.device} x {env.dims.world_size} ({env.dims}); {start}; {cfg.train.steps} steps")
    gpu = gpu_for_device_name(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    peak_flops = gpu.bf16_flops * env.dims.world_size if gpu is not None else None  # for MFU
    preemption = PreemptionWatcher()
    history: list[dict[str, float]] = []
    last_ckpt: Path | None = None
    bad_steps, exit_code, logged = 0, 0, 0  # logged: history rows already summarised in a log line

    def save() -> Path:
        try:
            return checkpointer.save(
                trainer.step, trainer.pm.parts, trainer.optimizer,
                trainer.train_state(wandb_id=logger.run_id, tokens_seen=tokens_seen, bad_steps=bad_steps),
                {"loader": loader.state_dict(), "dp": (env.dp_rank, env.dims.dp)}, trainer.engine,
            )
        except UnsafeToSave as e:
            prefix = f"{bad_steps} consecutive non-finite steps at step {trainer.step}; " if bad_steps else ""
            raise TrainingDiverged(f"{prefix}{e}; the last good checkpoint is {last_ckpt or resume_from}") from None

    try:
        while trainer.step < cfg.train.steps:
            t0 = time.perf_counter()
            batches = _micro_batches(loader, cfg.train.grad_accum)
            result = trainer.train_step(batches)
            dt = time.perf_counter() - t0
            step = trainer.step
            if result.skipped:
                bad_steps += 1
                logger.event(f"step {step + 1}: non-finite loss {result.loss} or grad norm {result.grad_norm}; "
                             f"update skipped ({bad_steps} in a row)")
                if bad_steps >= ck.max_bad_steps:
                    saved = f"saved {save()}" if ck.enabled else "checkpoints are disabled"
                    raise TrainingDiverged(
                        f"{bad_steps} consecutive non-finite steps at step {step}; {saved}. "
                        "Lower optim.lr, check the data, or resume from an earlier checkpoint."
                    )
                continue
            bad_steps = 0
            tokens_seen += result.tokens * env.dims.dp
            metrics = {
                "loss": result.loss, "lm_loss": result.lm_loss, "diffusion_loss": result.diffusion_loss,
                "grad_norm": result.grad_norm, "lr": result.lr,
                "tokens_per_s": result.tokens * env.dims.dp / dt, "tokens_seen": tokens_seen, "step_s": dt,
                "model_flops": step_model_flops(cfg.model, batches) * env.dims.dp,  # the global step's
            }
            history.append(metrics)
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                logger.log(step, window_summary(history[logged:], peak_flops))
                logged = len(history)
            preempted = preemption.requested()
            if ck.enabled and (preempted or (ck.interval and step % ck.interval == 0) or step == cfg.train.steps):
                last_ckpt = save()
            if preempted:
                logger.event(f"preemption signal: saved step {step} to {last_ckpt}; exiting for requeue")
                if env.is_main:  # tells slurm/pretrain_7b.sh to requeue (torchrun hides exit codes)
                    (out / "REQUEUE").write_text(f"{step}\n")
                exit_code = REQUEUE_EXIT_CODE
                break
        checkpointer.wait()
    finally:
        run_dir = logger.run_dir
        logger.close()
        preemption.restore()
    if env.is_main:
        print(f"done: {trainer.step} steps; outputs in {out}")
        if last_ckpt is not None:
            print(f"checkpoint: {last_ckpt}")
        if run_dir is not None:
            print(f"wandb run: {run_dir}")
    if exit_code:
        raise Preempted(exit_code)
    return history


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config under configs/")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    parser.add_argument("--check", action="store_true", help="only load and validate the config, the parallel "
                        "layout for --world-size processes and the device (slurm/ runs this once before launching); "
                        "exit 0, or 2 with one 'config error:' line")
    parser.add_argument("--world-size", type=int, default=None, help="with --check: trainer processes "
                        "(default: $WORLD_SIZE, else 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:  # pre-flight: no model, no process group
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            cfg.parallel.resolved(world)
            resolve_device(cfg.train.device)
            print(f"config ok: {args.config} for {world} process(es)")
            return 0
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        return e.exit_code
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
