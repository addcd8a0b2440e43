"""The training-engine interface: what the trainer, the checkpointer and the converter see of a layout.

An engine owns this rank's share of the model (its `parts`), the optimizer and the LR schedule, and
offers five things (docs/architecture.md §6):
  build               `build_engine(model, cfg, env, optimizers)` (the plain model goes in, parallelised)
  forward-backward    `forward_backward(batches, step)`: noise -> forward -> loss -> backward over this
                      rank's micro-batches (the shared `model.Objective`)
  optimizer step      `optimizer_step()`: clip, step, or skip a non-finite update where it can
  checkpoint state    `save(folder)` / `load(folder)` of model + optimizer in the engine's own format
  full weights        `full_state_dict()` online, `read_full_weights(folder)` offline (the converter)
`train_step` composes the first two with the loss normalisation and the cross-rank reductions.

Two implementations: parallel/torch_engine.py (FSDP2 / TP / PP on a DeviceMesh, DCP checkpoints) and
parallel/deepspeed_engine.py (ZeRO, DeepSpeed's partition files). Nothing outside this module and
the two implementations names an engine class.
"""

from __future__ import annotations

import abc
import contextlib
import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from config import Config, ConfigError
from model import LossNorm, Objective, PackedBatch

from .dims import DistEnv

DCP, DEEPSPEED = "dcp", "deepspeed"  # checkpoint formats of model + optimizer state
STATE_FILE = "train_state.pt"  # written by the checkpointer in every complete checkpoint


class TrainingDiverged(RuntimeError):
    """Non-finite losses or weights that training cannot recover from by itself."""


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

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        self.objective = Objective(cfg.diffusion, cfg.train.seed)
        self.grad_accum = cfg.train.grad_accum

    # ---- the step -------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm) -> torch.Tensor:
        """Noise, forward, loss and backward over this rank's micro-batches (on the device); returns
        this rank's summed [total, lm, diffusion] losses [3]."""

    @abc.abstractmethod
    def optimizer_step(self, finite_loss: bool) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients; returns (global grad norm, whether applied).
        Engines that can (`can_skip_update`) skip the update when the loss or the norm is not finite."""

    def train_step(self, batches: list[PackedBatch], step: int) -> StepResult:
        """One optimizer step over `batches` (this rank's micro-batches) at training step `step`.

        The loss is the step's mean over every text target and every image of all micro-batches and
        data-parallel ranks (not a mean of per-micro-batch means); gradient reduction averages over
        ranks, so each rank back-propagates dp x its share. Raises TrainingDiverged on a non-finite
        step of an engine that cannot skip the update.
        """
        batches = [b.to(self.device) for b in batches]
        self.train()
        lr = self.scheduler.get_last_lr()[0]
        totals = self.forward_backward(batches, step, self._step_norm(batches))
        if self.env.dims.dp > 1:
            dist.all_reduce(totals, group=self.env.group("dp"))
        # The grad norm and the losses are global, so every rank takes the same decision.
        grad_norm, applied = self.optimizer_step(bool(torch.isfinite(totals).all()))
        loss, lm, diff = totals.tolist()
        finite = math.isfinite(grad_norm) and all(math.isfinite(x) for x in (loss, lm, diff))
        if not applied or finite:
            return StepResult(loss, lm, diff, grad_norm, lr, sum(b.tokens.numel() for b in batches), not applied)
        raise TrainingDiverged(
            f"non-finite loss {loss} or grad norm {grad_norm} at step {step + 1} under parallel.engine="
            f"{self.cfg.parallel.engine}, which cannot skip the update; nothing was saved. Resume from the last "
            "checkpoint with a lower optim.lr, or check the data"
        )

    def _step_norm(self, batches: list[PackedBatch]) -> LossNorm:
        """The step's text targets and images over all micro-batches and data-parallel ranks."""
        counts = torch.tensor([sum(b.num_text_tokens() for b in batches), sum(b.num_images for b in batches)],
                              dtype=torch.int64, device=self.device)
        if self.env.dims.dp > 1:
            dist.all_reduce(counts, group=self.env.group("dp"))
        return LossNorm(*counts.tolist())

    def global_micro(self, micro: int) -> int:
        """The index of this rank's micro-batch `micro` among the whole step's (seeds its noise)."""
        return self.env.dp_rank * self.grad_accum + micro

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


def build_engine(model: nn.Module, cfg: Config, env: DistEnv, optimizers: OptimizerFactory) -> TrainingEngine:
    """The engine `cfg.parallel.engine` names, over the plain `model` (built on meta when parallel.meta_init)."""
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, env, optimizers)
    from .torch_engine import TorchEngine

    return TorchEngine(model, cfg, env, optimizers)


def checkpoint_format(folder: Path) -> str | None:
    """DCP or DEEPSPEED for a complete checkpoint folder, None otherwise."""
    if not (folder / STATE_FILE).is_file():
        return None
    if (folder / ".metadata").is_file():
        return DCP
    if (folder / DEEPSPEED).is_dir():
        return DEEPSPEED
    return None


ShapeCheck = Callable[[dict[str, tuple[int, ...]]], None]


def read_full_weights(folder: Path, check: ShapeCheck | None = None) -> dict[str, torch.Tensor]:
    """Offline (no process group): the full model weights of a checkpoint of either engine.

    `check` sees {name: shape} before any tensor is read (so a wrong checkpoint fails fast)."""
    fmt = checkpoint_format(folder)
    if fmt == DEEPSPEED:
        from .deepspeed_engine import read_weights
    elif fmt == DCP:
        from .torch_engine import read_weights
    else:
        raise ConfigError(f"'{folder}' is not a complete checkpoint (needs {STATE_FILE} and DCP .metadata or a "
                          f"{DEEPSPEED}/ folder)")
    return read_weights(folder, check)
