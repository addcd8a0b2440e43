"""The LM term under tensor parallelism: a vocab-parallel cross-entropy over the sharded LM head.

The model's own `lm_loss_sum` (model/losses.py) reads a plain head; under TP the head is
column-parallel (its weight a vocab-sharded DTensor) and the final hidden states are
sequence-sharded. Here the hidden states are gathered along the sequence once, each chunk's logits
stay vocab-sharded, and torch's loss_parallel cross-entropy (entered by the engine around the step)
reduces over the vocabulary shards, so no rank ever holds full-vocabulary logits. The engine hands
this function to the model's `Objective`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from model import ModelOutput
from model.losses import ce_sum, chunked_head_ce


def _sharded_head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """Local head shard [V/tp, d] on rows h [N, d]: vocab-sharded logits, summed loss_parallel CE."""
    logits = DTensor.from_local(F.linear(h, weight), tp_mesh, [Shard(1)], run_check=False)  # [N, V] sharded
    return ce_sum(logits, targets).full_tensor()


def vocab_parallel_lm_loss_sum(out: ModelOutput, text_targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The model's LM sum (`model.losses.lm_loss_sum`) for a tensor-parallel head and hidden states."""
    weight, h = out.head.weight, out.hidden
    if not isinstance(weight, DTensor):  # a layout without TP on this stage
        return chunked_head_ce(h, weight, text_targets, chunk)
    tp_mesh = weight.device_mesh
    if isinstance(h, DTensor):
        # Gathered along the sequence; each rank's gradient covers its vocab shard only (Partial).
        h = h.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    return chunked_head_ce(h, weight.to_local(), text_targets, chunk,
                           functools.partial(_sharded_head_ce, tp_mesh=tp_mesh))
