"""Pipeline parallelism with torch.distributed.pipelining: stages of the block stack.

Stages are balanced by layer count; the embeddings and the patch encoder sit on the first stage,
the final norm, LM head and patch decoder on the last. The per-row attention metadata (positions,
spans, image mask, timesteps) reaches every stage as keyword inputs of each micro-batch. A stage
keeps the model's parameter names (`layers.7.attention.wq.weight`), so checkpoints do not depend
on the layout.

U-Net skip activations travel with the hidden states from the first stage to the last. Pipeline
buffers have static shapes, so skips are padded to a fixed image capacity per micro-batch
(rows * (seq_len // (patches + 2)) images) and cut back to the real image count on the last stage.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from model.layers import rope_frequencies
from model.transfusion import TransfusionModel

SCHEDULES = {
    "gpipe": (ScheduleGPipe, False),
    "1f1b": (Schedule1F1B, False),
    "interleaved_1f1b": (ScheduleInterleaved1F1B, True),
    "zero_bubble": (ScheduleInterleavedZeroBubble, True),
}


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges per stage, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class PipelineStageModule(TransfusionModel):
    """The parts of a TransfusionModel that one pipeline stage runs, under their original names."""

    def __init__(self, model: TransfusionModel, layer_ids: list[int], is_first: bool, is_last: bool,
                 image_capacity: int) -> None:
        nn.Module.__init__(self)
        self.cfg = model.cfg
        self.is_first, self.is_last, self.image_capacity = is_first, is_last, image_capacity
        self.tok_embeddings = model.tok_embeddings if is_first else None
        self.patch_encoder = model.patch_encoder if is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if is_last else None
        self.output = model.output if is_last else None
        self.patch_decoder = model.patch_decoder if is_last else None

    def forward(
        self, *inputs: torch.Tensor, position_ids: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
        is_image: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """First stage: tokens -> (h, *skips); middle: (h, *skips) -> same; last: -> (logits,
        noise_pred, noise). The true noise rides along as an output because a pipeline target
        must be one tensor (the text targets)."""
        if self.is_first:
            h, skips = self.embed(inputs[0], is_image, noisy_latents, timesteps)
            skips = [self._pad(s) for s in skips]
        else:
            h, *skips = inputs
        inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, device=h.device)
        for layer in self.layers.values():
            h = layer(h, position_ids, inv_freq, kv_lo, kv_hi, None)
        if self.is_last:
            n = timesteps.shape[0]
            out = self.decode(h, is_image, timesteps, [s[:n] for s in skips])
            return out.logits, out.noise_pred, noise
        # Skips pass through middle stages; clone so each stage owns its outputs for backward.
        return (h, *[s.clone() for s in skips])

    def _pad(self, s: torch.Tensor) -> torch.Tensor:
        if s.shape[0] > self.image_capacity:
            raise ValueError(f"{s.shape[0]} images exceed the pipeline image capacity {self.image_capacity}")
        return torch.cat([s, s.new_zeros(self.image_capacity - s.shape[0], *s.shape[1:])])


def stage_ids_for_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stage indices a rank runs: looped placement, rank r holds r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(virtual)]


def build_pipeline(
    model: TransfusionModel, pp_rank: int, pp: int, schedule_name: str, virtual_stages: int,
    n_microbatches: int, image_capacity: int, loss_fn: Callable, device: torch.device,
    pp_group: torch.distributed.ProcessGroup, wrap_stage: Callable[[PipelineStageModule], None],
) -> tuple[PipelineScheduleSingle | PipelineScheduleMulti, list[PipelineStageModule]]:
    """Split `model` into this rank's stage modules, let `wrap_stage` parallelise each, build the schedule."""
    schedule_cls, multi = SCHEDULES[schedule_name]
    virtual = virtual_stages if multi else 1
    n_stages = pp * virtual
    ranges = split_layers(model.cfg.n_layers, n_stages)
    modules, stages = [], []
    for s in stage_ids_for_rank(pp_rank, pp, virtual):
        module = PipelineStageModule(model, ranges[s], s == 0, s == n_stages - 1, image_capacity)
        wrap_stage(module)
        modules.append(module)
        stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))
    if multi:
        schedule = schedule_cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = schedule_cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule, modules

