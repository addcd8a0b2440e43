"""The torch training engine: FSDP2 / HSDP, tensor + sequence and pipeline parallelism on one DeviceMesh.

The plain model is laid out by `parallelize` (parallel/parallelize.py); model + optimizer state are
saved with torch.distributed.checkpoint under the plain model's parameter names, so a checkpoint
written by one layout loads into any other (DCP reshards) and into one process.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.tensor.parallel import loss_parallel

from config import Config, ConfigError
from model import LossNorm, ModelOutput, PackedBatch

from .dims import DistEnv
from .engine import DCP, OptimizerFactory, ShapeCheck, TrainingEngine, image_capacity
from .grad_clip import clip_grad_norm
from .parallelize import parallelize

MODEL_KEY, OPTIM_KEY = "model", "optim"  # top-level keys of the DCP state


def merge_parts(parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names equal the full model's, over this rank's model parts.

    A pipeline rank may hold several stages (copies of the model that each kept some layers); their
    `layers` are merged into one ModuleDict next to the other modules they hold.
    """
    if len(parts) == 1:
        return parts[0]
    holder, layers = nn.Module(), nn.ModuleDict()
    for part in parts:
        for name, child in part.named_children():
            if name == "layers":
                layers.update(child)
            else:
                holder.add_module(name, child)
    holder.add_module("layers", layers)
    return holder


class TorchEngine(TrainingEngine):
    """FSDP2 / TP / PP over the plain model; DCP checkpoints; skips non-finite updates."""

    format = DCP
    can_skip_update = True

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv, optimizers: OptimizerFactory) -> None:
        super().__init__(cfg, env)
        self._pp_losses: list[torch.Tensor] = []
        self._norm: LossNorm | None = None  # this step's loss denominators, read by the pipeline's loss
        self.pm = parallelize(model, env, cfg.parallel, cfg.train.dtype, cfg.train.grad_accum, image_capacity(cfg),
                              self._pipeline_loss)
        self.parts = self.pm.parts
        self.optimizer = optimizers.optimizer(list(self.pm.parameters()))
        self.scheduler = optimizers.scheduler(self.optimizer)

    # ---- the step -------------------------------------------------------------------------------
    def forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with loss_parallel() if self.pm.loss_parallel else contextlib.nullcontext():
            if self.pm.schedule is not None:
                return self._pipeline_forward_backward(batches, step, norm)
            totals = torch.zeros(3, device=self.device)
            for micro, batch in enumerate(batches):
                self.pm.set_gradient_sync(micro, len(batches), self.cfg.parallel.grad_sync)
                with self.autocast():
                    losses = self.objective(self.parts[0], batch, step, self.global_micro(micro), norm)
                (losses.total * self.env.dims.dp).backward()
                totals += torch.stack([losses.total, losses.lm, losses.diffusion]).detach()
            return totals

    def _pipeline_forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm) -> torch.Tensor:
        kwarg_mbs, target_mbs = [], []
        for micro, batch in enumerate(batches):
            noisy, t, noise = self.objective.inputs(batch, step, self.global_micro(micro))
            kwarg_mbs.append({
                "position_ids": batch.position_ids, "kv_lo": batch.kv_lo, "kv_hi": batch.kv_hi,
                "is_image": batch.is_image, "noisy_latents": noisy, "timesteps": t, "noise": noise,
            })
            target_mbs.append(batch.text_targets)
        self._pp_losses.clear()
        self._norm = norm
        first = any(part.is_first for part in self.parts)
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

    def _pipeline_loss(self, outputs: tuple[torch.Tensor, ...], text_targets: torch.Tensor) -> torch.Tensor:
        """The last stage's loss: it returns (final-normed hidden, noise_pred, noise); the LM head is
        read at text-target positions only, as in the plain path."""
        hidden, noise_pred, noise = outputs
        head = next(part.output for part in self.parts if part.is_last)
        losses = self.objective.loss(ModelOutput(noise_pred=noise_pred, hidden=hidden, head=head), text_targets,
                                     noise, self._norm)
        self._pp_losses.append(torch.stack([losses.total, losses.lm, losses.diffusion]).detach())
        return losses.total * self.env.dims.dp  # summed over micro-batches (scale_grads=False)

    def optimizer_step(self, finite_loss: bool) -> tuple[float, bool]:
        pp_group = self.env.group("pp") if self.env.dims.pp > 1 else None
        norm = clip_grad_norm(self.pm.parameters(), self.cfg.optim.grad_clip or float("inf"), pp_group)
        if finite_loss and bool(torch.isfinite(norm)):
            self.optimizer.step()
            self.scheduler.step()
            return float(norm), True
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), False

    # ---- checkpoint state -----------------------------------------------------------------------
    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(merge_parts(self.parts), self.optimizer)
        return {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}

    def save(self, folder: Path, async_save: bool = False) -> Future | None:
        if async_save:
            return dcp.async_save(self._state(), checkpoint_id=str(folder))
        dcp.save(self._state(), checkpoint_id=str(folder))
        return None

    def load(self, folder: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(merge_parts(self.parts), self.optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIM_KEY])

    def local_tensors(self) -> list[torch.Tensor]:
        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t

        tensors = [local(p.detach()) for part in self.parts for p in part.parameters()]
        return tensors + [local(v) for st in self.optimizer.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor) and v.dim() > 0]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors of the parts this rank holds (the whole model unless pipelined), on CPU."""
        # cpu_offload would leave the dict empty on every rank but 0; pipeline ranks each need theirs.
        sd = get_model_state_dict(merge_parts(self.parts), options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu().clone() for k, v in sd.items()}


def read_weights(folder: Path, check: ShapeCheck | None = None) -> dict[str, torch.Tensor]:
    """Offline: the model tensors of a DCP checkpoint, resharded by DCP into full tensors."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = MODEL_KEY + "."
    stored = {k[len(prefix):]: v for k, v in metadata.items()
              if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not stored:
        raise ConfigError(f"checkpoint '{folder}' holds no '{MODEL_KEY}' tensors")
    if check is not None:
        check({k: tuple(v.size) for k, v in stored.items()})
    state = {n: torch.empty(tuple(m.size), dtype=m.properties.dtype) for n, m in stored.items()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL_KEY: state}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    return state
