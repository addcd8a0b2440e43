"""The training-engine interface: what the trainer, the checkpointer and the planner see of a layout.

An engine owns this rank's share of the model (its `parts`), the optimizer and the LR schedule, and
offers (docs/architecture.md §5.4):
  forward-backward    `forward_backward(batches, step, norm, hooks)`: noise -> forward -> loss ->
                      backward over this rank's micro-batches (the shared `model.Objective`)
  optimizer step      `optimizer_step(finite_loss, hooks)`: clip, step, or skip a non-finite update
  checkpoint state    `save(folder)` / `load(folder)` of model + optimizer in the engine's own format
  full weights        `full_state_dict()` (online; offline reading is trainer/checkpoint_weights.py)
  held-out forward    `evaluate(batches, stats)`: forward only, fixed noise, summed statistics
  EMA weights         `ema` (train.ema_decay > 0): parallel/ema.py, updated after every applied step
`train_step` composes the first two with the loss normalisation and the cross-rank reductions: it
is the one training step, run by the trainer and, under fake tensors, by the planner, which watches
its phases through `StepHooks`.

This module is the interface only. The implementations (parallel/torch_engine.py: FSDP2 / TP / PP on a
DeviceMesh, DCP checkpoints; parallel/deepspeed_engine.py: ZeRO) import it, and `parallel/engines.py`
builds the one a config names; nothing else names an engine class.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from config import Config
from model import LossNorm, LossOutput, Objective, PackedBatch
from model.heldout import HeldoutBatch, HeldoutStats
from model.losses import LmLossSum, lm_loss_sum

from .dims import DistEnv
from .ema import EmaWeights

# Checkpoint formats of model + optimizer state (`TrainingEngine.format`), and the top-level keys of
# a DCP checkpoint's state: what the offline reader (trainer/checkpoint_weights.py) relies on.
DCP, DEEPSPEED = "dcp", "deepspeed"
MODEL_KEY, OPTIM_KEY, EMA_KEY = "model", "optim", "ema"


class NonFiniteUpdate(RuntimeError):
    """A non-finite step was applied by an engine that cannot skip an update: the weights are lost."""


class OptimizerFactory(Protocol):
    """How the trainer wants its optimizer and LR schedule built (the engine decides over which tensors)."""

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer: ...

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler: ...


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    diffusion_loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool = False  # a non-finite loss or gradient: no update was made


class StepHooks:
    """What a caller may observe of a step: its phase boundaries, the module calls, the end of each
    micro-batch's backward, the run of a pipeline schedule. The trainer uses these defaults (they
    just run the step); the planner counts FLOPs, collectives and memory per phase with them."""

    def phase(self, name: str) -> None:
        """The step enters `name`: forward[_accum], backward[_accum] (_accum: a micro-batch before the
        step's last), clip, optimizer."""

    def call(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Runs `module(*args, **kwargs)` (one forward of a model part)."""
        return module(*args, **kwargs)

    def after_backward(self, parts: list[nn.Module]) -> None:
        """After the backward of one micro-batch through `parts`."""

    def run_schedule(self, schedule: Any, loss_fn: Callable, arg_mbs: list | None, kwarg_mbs: list[dict],
                     target_mbs: list | None) -> None:
        """Runs a pipeline schedule's step over the micro-batches (forward, `loss_fn` on the last
        stage, backward); the planner replays the schedule's actions here instead."""
        schedule.step(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs, return_outputs=False)


NO_HOOKS = StepHooks()


def micro_phase(kind: str, micro: int, n_micro: int) -> str:
    """`kind` (forward/backward) of micro-batch `micro` of `n_micro`: its StepHooks phase name."""
    return kind if micro == n_micro - 1 else f"{kind}_accum"


def image_capacity(cfg: Config) -> int:
    """Most images one micro-batch can hold (pipeline buffers are sized for it)."""
    return cfg.train.batch_size * (cfg.train.seq_len // (cfg.model.patches_per_image + 2))


class TrainingEngine(abc.ABC):
    """One parallel layout's training step, checkpoint state and weights (see the module docstring)."""

    format: ClassVar[str]  # checkpoint format of save()/load()
    can_skip_update: ClassVar[bool]  # False: a non-finite step has already changed the weights

    parts: list[nn.Module]  # this rank's model modules (one, or its pipeline stages), plain parameter names
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EmaWeights | None = None  # with train.ema_decay > 0, where the engine supports it

    def __init__(self, cfg: Config, env: DistEnv, lm_loss: LmLossSum = lm_loss_sum) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        self.objective = Objective(cfg.diffusion, cfg.train.seed, lm_loss, env.dims.dp * cfg.train.grad_accum)
        self.grad_accum = cfg.train.grad_accum

    # ---- the step -------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm,
                         hooks: StepHooks = NO_HOOKS) -> torch.Tensor:
        """Noise, forward, loss and backward over this rank's micro-batches (on the device); returns
        this rank's summed [total, lm, diffusion] losses [3]."""

    @abc.abstractmethod
    def optimizer_step(self, finite_loss: bool, hooks: StepHooks = NO_HOOKS) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients; returns (global grad norm, whether applied).
        Engines that can (`can_skip_update`) skip the update when the loss or the norm is not finite."""

    def micro_batch(self, model: nn.Module, batch: PackedBatch, step: int, micro: int, n_micro: int, norm: LossNorm,
                    hooks: StepHooks, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """One micro-batch of a step that is not pipelined: the objective (noise, forward, loss) under
        autocast, then `backward` of the scaled loss outside it; returns its detached [total, lm,
        diffusion] [3]. A pipeline's last stage applies the same `objective.loss` and `scaled`."""
        hooks.phase(micro_phase("forward", micro, n_micro))
        with self.autocast():
            losses = self.objective(functools.partial(hooks.call, model), batch, step, self.global_micro(micro), norm)
        hooks.phase(micro_phase("backward", micro, n_micro))
        loss, terms = self.scaled(losses)
        backward(loss)
        hooks.after_backward(self.parts)
        return terms

    def scaled(self, losses: LossOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(dp x the micro-batch's loss, to back-propagate; its detached [total, lm, diffusion] [3]).

        The dp factor: gradient reduction averages over the data-parallel ranks, while each rank's
        loss is already its share of the step's global mean (`LossNorm`)."""
        terms = torch.stack([losses.total, losses.lm, losses.diffusion]).detach().float()
        return losses.total * self.env.dims.dp, terms

    def train_step(self, batches: list[PackedBatch], step: int, hooks: StepHooks = NO_HOOKS) -> StepResult:
        """One optimizer step over `batches` (this rank's micro-batches) at training step `step`.

        The loss is the step's mean over every text target and every image of all micro-batches and
        data-parallel ranks (not a mean of per-micro-batch means); gradient reduction averages over
        ranks, so each rank back-propagates dp x its share. Raises NonFiniteUpdate on a non-finite
        step of an engine that cannot skip the update.
        """
        batches = [b.to(self.device) for b in batches]
        self.train()
        lr = self.scheduler.get_last_lr()[0]
        totals = self.forward_backward(batches, step, self._step_norm(batches), hooks)
        if self.env.dims.dp > 1:
            dist.all_reduce(totals, group=self.env.group("dp"))
        # The grad norm and the losses are global, so every rank takes the same decision.
        grad_norm, applied = self.optimizer_step(bool(torch.isfinite(totals).all()), hooks)
        if applied and self.ema is not None:
            self.ema.update()
        loss, lm, diff = totals.tolist()
        finite = math.isfinite(grad_norm) and all(math.isfinite(x) for x in (loss, lm, diff))
        if not applied or finite:
            return StepResult(loss, lm, diff, grad_norm, lr, sum(b.tokens.numel() for b in batches), not applied)
        raise NonFiniteUpdate(
            f"non-finite loss {loss} or grad norm {grad_norm} at step {step + 1} under parallel.engine="
            f"{self.cfg.parallel.engine}, which cannot skip the update; nothing was saved. Resume from the last "
            "checkpoint with a lower optim.lr, or check the data"
        )

    def _step_norm(self, batches: list[PackedBatch]) -> LossNorm:
        """The step's text targets and generated images over all micro-batches and data-parallel ranks."""
        counts = torch.tensor([sum(b.num_text_tokens() for b in batches), sum(int(b.generated.sum()) for b in batches)],
                              dtype=torch.int64, device=self.device)
        if self.env.dims.dp > 1:
            dist.all_reduce(counts, group=self.env.group("dp"))
        return LossNorm(*counts.tolist())

    def global_micro(self, micro: int) -> int:
        """The index of this rank's micro-batch `micro` among the whole step's (seeds its noise)."""
        return self.env.dp_rank * self.grad_accum + micro

    # ---- held-out evaluation --------------------------------------------------------------------
    def evaluate(self, batches: list[HeldoutBatch], stats: HeldoutStats) -> torch.Tensor:
        """Forward only over this rank's held-out micro-batches (grad_accum of them, as in a step):
        `stats` summed over them and over every rank [stats.size]. Touches no weight, optimizer state
        or training random generator: noise and timesteps come with the batches."""
        batches = [b.to(self.device) for b in batches]
        for part in self.parts:
            part.eval()
        with torch.no_grad(), self.loss_context():
            sums = self.heldout_sums(batches, stats)
        if self.env.dims.dp > 1:
            dist.all_reduce(sums, group=self.env.group("dp"))
        return sums

    def heldout_sums(self, batches: list[HeldoutBatch], stats: HeldoutStats) -> torch.Tensor:
        """This rank's `stats` over `batches` through `forward_model`, under the training autocast."""
        sums = torch.zeros(stats.size, dtype=torch.float64, device=self.device)
        for hb in batches:
            b = hb.batch
            with self.autocast():
                noisy = hb.noisy_latents(self.objective.schedule)
                out = self.forward_model(b.tokens, b.position_ids, b.kv_lo, b.kv_hi, b.is_image, noisy,
                                         hb.model_timesteps)
                sums += stats(out, hb.targets, hb.noise, hb.timesteps, self.objective.lm_loss)
        return sums

    @property
    def forward_model(self) -> nn.Module:
        """What a forward that is not pipelined calls: the model as the layout wrapped it."""
        return self.parts[0]

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Entered around forward and backward (and a held-out forward); a layout may need one."""
        return contextlib.nullcontext()

    # ---- checkpoint state -----------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, folder: Path, async_save: bool = False) -> Future | None:
        """Collective: write model + optimizer state into `folder` (a Future while an async write runs)."""

    @abc.abstractmethod
    def load(self, folder: Path) -> None:
        """Collective: restore model + optimizer state written by `save` (any layout of this engine)."""

    @abc.abstractmethod
    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's shards of the weights and optimizer moments (for the finiteness check)."""

    # ---- weights --------------------------------------------------------------------------------
    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's state dict with plain-model names, on CPU on every rank."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward + loss when train.dtype=bf16 (fp32 master weights)."""
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> None:
        for part in self.parts:
            part.train()

    def num_params(self) -> int:
        """Parameters of this rank's parts (the whole model on one process)."""
        return sum(p.numel() for part in self.parts for p in part.parameters())
