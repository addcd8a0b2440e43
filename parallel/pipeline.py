"""Pipeline parallelism with torch.distributed.pipelining: stages of the block stack.

Each stage is a copy of the plain TransfusionModel with the modules it does not hold removed: the
layers of other stages are deleted from `layers` (so kept ones keep their names,
`layers.7.attention.wq.weight`, and checkpoints do not depend on the layout), the embeddings and the
patch encoder exist on the first stage only, the final norm, LM head and patch decoder on the last
only. The model's own forward skips what a copy lacks (model/transfusion.py); `_pipeline_forward`
here adapts it to what PipelineStage passes and expects: the previous stage's output tuple as
positional inputs, the per-row metadata (positions, spans, image mask, timesteps) and the true noise
as keyword inputs of each micro-batch, tuples of tensors with static shapes as outputs.

U-Net skip activations travel with the hidden states from the first stage to the last. Pipeline
buffers have static shapes, so skips are padded to a fixed image capacity per micro-batch
(rows * (seq_len // (patches + 2)) images) and cut back to the real image count on the last stage.
The last stage returns the final-normed hidden states, not logits: the loss function reads the LM
head (the last stage's `output`) at text-target positions only, as the single-process path does.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

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


def stage_copy(model: TransfusionModel, layer_ids: list[int], is_first: bool, is_last: bool) -> TransfusionModel:
    """A copy of `model` holding only the layers `layer_ids`, plus the input modules if `is_first`
    and the output modules if `is_last`; the others are None (deleted, for layers). Works on any
    device, the meta device included; parameter names are the model's."""
    dropped = [layer for name, layer in model.layers.items() if int(name) not in layer_ids]
    if not is_first:
        dropped += [model.tok_embeddings, model.patch_encoder]
    if not is_last:
        dropped += [model.norm, model.output, model.patch_decoder]
    # deepcopy's memo maps the dropped modules to None: they are never copied (a materialised model
    # may be large) and come out of the copy as None children.
    stage = copy.deepcopy(model, memo={id(m): None for m in dropped})
    for name in [name for name, layer in stage.layers.items() if layer is None]:
        del stage.layers[name]
    return stage


def _pad(s: torch.Tensor, capacity: int) -> torch.Tensor:
    """Skip s [N_img, c, h, w] zero-padded to [capacity, c, h, w] (pipeline buffers have static shapes)."""
    if s.shape[0] > capacity:
        raise ValueError(f"{s.shape[0]} images exceed the pipeline image capacity {capacity}")
    return torch.cat([s, s.new_zeros(capacity - s.shape[0], *s.shape[1:])])


def _pipeline_forward(
    stage: TransfusionModel, image_capacity: int, *inputs: torch.Tensor, noise: torch.Tensor,
    **meta: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The stage's forward as PipelineStage calls it: `inputs` is (tokens,) on the first stage and
    the previous stage's (h, *skips) on the others; `meta` holds position_ids, kv_lo, kv_hi,
    is_image, noisy_latents and timesteps. Runs the model's own forward and returns
    (h [B, S, d], *skips padded to [image_capacity, c, h, w]) before the last stage, and
    (final-normed hidden [B, S, d], noise_pred [N_img, C, h, w], noise) on the last one: the true
    noise rides along because a pipeline target must be one tensor (the text targets)."""
    x, *skips = inputs
    if stage.is_last:  # cut the padding back to the real images
        skips = [s[: meta["timesteps"].shape[0]] for s in skips]
    out = TransfusionModel.forward(stage, x, **meta, skips=skips)
    if stage.is_last:
        return out.hidden, out.noise_pred, noise
    h, skips = out
    if stage.is_first:
        skips = [_pad(s, image_capacity) for s in skips]
    else:  # passed through: clone so that each stage owns its outputs for backward
        skips = [s.clone() for s in skips]
    return (h, *skips)


def stage_module(
    model: TransfusionModel, layer_ids: list[int], is_first: bool, is_last: bool, image_capacity: int,
) -> TransfusionModel:
    """`stage_copy` whose forward is `_pipeline_forward` (what PipelineStage calls)."""
    stage = stage_copy(model, layer_ids, is_first, is_last)
    # An instance attribute, not a wrapper module: parameter names stay the model's.
    stage.forward = functools.partial(_pipeline_forward, stage, image_capacity)
    return stage


def stage_ids_for_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stage indices a rank runs: looped placement, rank r holds r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(virtual)]


def build_pipeline(
    model: TransfusionModel, pp_rank: int, pp: int, schedule_name: str, virtual_stages: int,
    n_microbatches: int, image_capacity: int, loss_fn: Callable, device: torch.device,
    pp_group: torch.distributed.ProcessGroup, wrap_stage: Callable[[TransfusionModel], None],
) -> tuple[PipelineScheduleSingle | PipelineScheduleMulti, list[TransfusionModel]]:
    """Copy this rank's stages out of `model`, let `wrap_stage` parallelise each, build the schedule.

    The returned stage modules expose `is_first` / `is_last`; their forward is `_pipeline_forward`.
    """
    schedule_cls, multi = SCHEDULES[schedule_name]
    virtual = virtual_stages if multi else 1
    n_stages = pp * virtual
    ranges = split_layers(model.cfg.n_layers, n_stages)
    modules, stages = [], []
    for s in stage_ids_for_rank(pp_rank, pp, virtual):
        module = stage_module(model, ranges[s], s == 0, s == n_stages - 1, image_capacity)
        wrap_stage(module)
        modules.append(module)
        stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))
    if multi:
        schedule = schedule_cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = schedule_cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule, modules
