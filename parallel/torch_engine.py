"""The torch training engine: FSDP2 / HSDP, tensor + sequence and pipeline parallelism on one DeviceMesh.

The plain model is laid out by `parallelize` (parallel/parallelize.py); model + optimizer state are
saved with torch.distributed.checkpoint under the plain model's parameter names, so a checkpoint
written by one layout loads into any other (DCP reshards) and into one process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from config import Config
from model import LossNorm, ModelOutput, PackedBatch
from model.heldout import HeldoutBatch, HeldoutStats
from model.losses import lm_loss_sum

from .dims import DistEnv
from .ema import EmaWeights
from .engine import (
    DCP, EMA_KEY, MODEL_KEY, NO_HOOKS, OPTIM_KEY, OptimizerFactory, StepHooks, TrainingEngine, image_capacity,
)
from .grad_clip import clip_grad_norm
from .loss_parallel import vocab_parallel_lm_loss_sum
from .parallelize import parallelize

log = logging.getLogger(__name__)


def pack_target(batch: PackedBatch) -> torch.Tensor:
    """A micro-batch's loss target as one tensor (the pipeline schedule's stage set-up takes tensors
    only): [B, S, N_img], the generated-image mask [N_img], the text targets [B * S]."""
    B, S = batch.text_targets.shape
    head = torch.tensor([B, S, batch.num_images], dtype=torch.int64, device=batch.text_targets.device)
    return torch.cat([head, batch.generated.long(), batch.text_targets.flatten()])


def unpack_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text targets [B, S], generated [N_img]) of `pack_target`."""
    B, S, n = target[:3].tolist()
    return target[3 + n:].view(B, S), target[3:3 + n].bool()


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


def _under(context: Callable[[], contextlib.AbstractContextManager], fn: Callable) -> Callable:
    """`fn` run inside a fresh `context()` (autocast around a pipeline stage's forward only)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with context():
            return fn(*args, **kwargs)

    return run


class TorchEngine(TrainingEngine):
    """FSDP2 / TP / PP over the plain model; DCP checkpoints; skips non-finite updates.

    Not pipelined, each micro-batch runs `TrainingEngine.micro_batch` (forward + loss under autocast,
    backward outside it). Pipelined, torch's schedule runs the stages; the same autocast policy is
    applied by wrapping each stage's forward and the loss, so backward runs outside autocast too.
    """

    format = DCP
    can_skip_update = True

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv, optimizers: OptimizerFactory) -> None:
        super().__init__(cfg, env, vocab_parallel_lm_loss_sum if env.dims.tp > 1 else lm_loss_sum)
        self._pp_losses: list[torch.Tensor] = []
        self._norm: LossNorm | None = None  # this step's loss denominators, read by the pipeline's loss
        self._heldout: tuple[HeldoutStats, torch.Tensor] | None = None  # a held-out forward's stats and sums
        self._loss_fn = _under(self.autocast, self.pipeline_loss)  # the pipeline schedule's loss
        self.pm = parallelize(model, env, cfg.parallel, cfg.train.dtype, cfg.train.grad_accum, image_capacity(cfg),
                              self._loss_fn)
        self.parts = self.pm.parts
        if self.pm.schedule is not None:
            for part in self.parts:
                part.forward = _under(self.autocast, part.forward)
        self.optimizer = optimizers.optimizer(list(self.pm.parameters()))
        self.scheduler = optimizers.scheduler(self.optimizer)
        if cfg.train.ema_decay > 0:
            self.ema = EmaWeights(dict(merge_parts(self.parts).named_parameters()), cfg.train.ema_decay)

    # ---- the step -------------------------------------------------------------------------------
    def forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm,
                         hooks: StepHooks = NO_HOOKS) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.loss_context():
            if self.pm.schedule is not None:
                return self._pipeline_forward_backward(batches, step, norm, hooks)
            totals = torch.zeros(3, device=self.device)
            for micro, batch in enumerate(batches):
                self.pm.set_gradient_sync(micro, len(batches), self.cfg.parallel.grad_sync)
                totals += self.micro_batch(self.parts[0], batch, step, micro, len(batches), norm, hooks,
                                           torch.Tensor.backward)
            return totals

    def loss_context(self) -> contextlib.AbstractContextManager:
        """torch's loss_parallel around forward and backward when the LM head is vocab-sharded (TP)."""
        return loss_parallel() if self.pm.loss_parallel else contextlib.nullcontext()

    @staticmethod
    def _stage_inputs(batch: PackedBatch, noisy: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword inputs of every pipeline stage for one micro-batch with its noisy latents,
        timesteps and noise; the true noise rides along to the last stage's loss."""
        return {"position_ids": batch.position_ids, "kv_lo": batch.kv_lo, "kv_hi": batch.kv_hi,
                "is_image": batch.is_image, "noisy_latents": noisy, "timesteps": t, "noise": noise}

    def _pipeline_forward_backward(self, batches: list[PackedBatch], step: int, norm: LossNorm,
                                   hooks: StepHooks) -> torch.Tensor:
        # Noise drawn as the plain step draws it.
        kwarg_mbs = [self._stage_inputs(b, *self.objective.inputs(b, step, self.global_micro(micro)))
                     for micro, b in enumerate(batches)]
        self._pp_losses.clear()
        self._norm = norm
        first = any(part.is_first for part in self.parts)
        hooks.run_schedule(self.pm.schedule, self._loss_fn, [(b.tokens,) for b in batches] if first else None,
                           kwarg_mbs, [pack_target(b) for b in batches] if self.pm.has_last_stage else None)
        totals = torch.zeros(3, device=self.device)
        # Stage set-up on the first step also calls the loss function (shape inference): keep the real ones.
        for losses in self._pp_losses[-len(batches):]:
            totals += losses
        # Only the last stage computed the losses; share them with the other stages.
        dist.all_reduce(totals, group=self.env.group("pp"))
        return totals

    def pipeline_loss(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor | tuple) -> torch.Tensor:
        """The last stage's loss (`objective.loss` and `scaled`, as in the plain path): the stage returns
        (final-normed hidden, noise_pred, noise); the LM head is read at text-target positions only.
        The target is `pack_target`'s (text targets, generated images); in a held-out forward it is
        (targets by kind, timesteps) and the stats are summed instead."""
        hidden, noise_pred, noise = outputs
        head = next(part.output for part in self.parts if part.is_last)
        if self._heldout is not None:
            stats, sums = self._heldout
            targets, timesteps = target
            sums += stats(ModelOutput(noise_pred, hidden, head), targets, noise, timesteps, self.objective.lm_loss)
            return hidden.new_zeros(())  # nothing back-propagates from a held-out forward
        text_targets, generated = unpack_target(target)
        loss, terms = self.scaled(self.objective.loss(ModelOutput(noise_pred, hidden, head), text_targets, noise,
                                                      self._norm, generated))
        self._pp_losses.append(terms)
        return loss  # summed over micro-batches (scale_grads=False)

    def evaluate(self, batches: list[HeldoutBatch], stats: HeldoutStats) -> torch.Tensor:
        try:
            return super().evaluate(batches, stats)
        finally:
            # With reshard_after_forward=False a forward leaves its gathered parameters for a backward
            # that does not come here; drop them, or the next forward would reuse them (stale after
            # an EMA swap) instead of gathering the current shards.
            for part in self.parts:
                for module in part.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()

    def heldout_sums(self, batches: list[HeldoutBatch], stats: HeldoutStats) -> torch.Tensor:
        """Pipelined, torch's forward-only schedule (`eval`) runs the stages and the last one sums
        the stats (`pipeline_loss`); shared with the other stages like the training losses."""
        if self.pm.schedule is None:
            return super().heldout_sums(batches, stats)
        kwarg_mbs = [self._stage_inputs(hb.batch, hb.noisy_latents(self.objective.schedule), hb.model_timesteps, hb.noise)
                     for hb in batches]
        first = any(part.is_first for part in self.parts)
        self._heldout = stats, torch.zeros(stats.size, dtype=torch.float64, device=self.device)
        try:
            self.pm.schedule.eval(arg_mbs=[(hb.batch.tokens,) for hb in batches] if first else None,
                                  kwarg_mbs=kwarg_mbs,
                                  target_mbs=[(hb.targets, hb.timesteps) for hb in batches]
                                  if self.pm.has_last_stage else None,
                                  return_outputs=False)
            sums = self._heldout[1]
        finally:
            self._heldout = None
        dist.all_reduce(sums, group=self.env.group("pp"))
        return sums

    def optimizer_step(self, finite_loss: bool, hooks: StepHooks = NO_HOOKS) -> tuple[float, bool]:
        pp_group = self.env.group("pp") if self.env.dims.pp > 1 else None
        hooks.phase("clip")
        norm = clip_grad_norm(self.pm.parameters(), self.cfg.optim.grad_clip or float("inf"), pp_group)
        if finite_loss and bool(torch.isfinite(norm)):
            hooks.phase("optimizer")
            self.optimizer.step()
            self.scheduler.step()
            return float(norm), True
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), False

    # ---- checkpoint state -----------------------------------------------------------------------
    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(merge_parts(self.parts), self.optimizer)
        state = {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}
        if self.ema is not None:
            state[EMA_KEY] = self.ema.state_dict()
        return state

    def save(self, folder: Path, async_save: bool = False) -> Future | None:
        if async_save:
            return dcp.async_save(self._state(), checkpoint_id=str(folder))
        dcp.save(self._state(), checkpoint_id=str(folder))
        return None

    def load(self, folder: Path) -> None:
        state = self._state()
        saved_ema = any(k.startswith(EMA_KEY + ".")
                        for k in dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
        if self.ema is not None and not saved_ema:  # EMA turned on at this resume: it starts here
            del state[EMA_KEY]
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(merge_parts(self.parts), self.optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIM_KEY])
        if self.ema is not None and not saved_ema:
            log.warning("checkpoint %s holds no EMA weights (saved with train.ema_decay=0): the EMA starts from "
                        "its weights", folder)
            self.ema.reset()

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

    # ---- weights from elsewhere (checkpoint.init_from; trainer/init_weights.py WeightLoader) -------
    def weight_names(self) -> set[str]:
        """Plain-model names of the weights this rank's parts hold (all of them unless pipelined)."""
        return set(get_model_state_dict(merge_parts(self.parts)))  # local shards: no gather

    def load_weights(self, full: dict[str, torch.Tensor]) -> None:
        """Collective: set the named weights (full tensors, plain names, a subset of `weight_names`);
        the rest keep their values. The EMA, if any, restarts from the result."""
        set_model_state_dict(merge_parts(self.parts), full, options=StateDictOptions(full_state_dict=True, strict=False))
        self._weights_replaced()

    def load_checkpoint_weights(self, folder: Path, names: set[str]) -> None:
        """Collective: set the named weights from a DCP checkpoint of any layout, resharded by DCP."""
        model = merge_parts(self.parts)
        state = {k: v for k, v in get_model_state_dict(model).items() if k in names}  # this layout's shards
        dcp.load({MODEL_KEY: state}, checkpoint_id=str(folder))
        set_model_state_dict(model, state, options=StateDictOptions(strict=False))
        self._weights_replaced()

    def _weights_replaced(self) -> None:
        if self.ema is not None:
            self.ema.reset()
