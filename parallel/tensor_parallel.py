"""Tensor + sequence parallelism for Transfusion blocks, applied from outside with DTensor plans.

Between blocks the residual stream is sequence-sharded (local [B, S/tp, d]); attention and MLP
inputs are all-gathered, q/k/v/w1/w3 are column-parallel (heads and hidden units split over tp),
o/w2 are row-parallel with a reduce-scatter back to sequence shards, norms are sequence-parallel.
The attention spans (kv_lo/kv_hi) and positions stay whole: attention runs on the full sequence
with this rank's heads, so every shard sees exactly the spans of one process.

Choices for the parts around the blocks: the embedding is vocab-parallel with a replicated output
(the image patch vectors are scattered into it before the sequence is split); the LM head is
column-parallel with vocab-sharded logits for a vocab-parallel loss (no full-vocab gather); the
patch codecs are small next to the blocks and stay replicated on the tp ranks (the decoder is
handed the all-gathered sequence).
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

# TransformerBlock.forward(x, position_ids, inv_freq, kv_lo, kv_hi, cache) and Attention.forward
# take the same arguments, always passed positionally; only x has a layout.
_BLOCK_ARGS_TAIL = (None, None, None, None, None)


def block_plan() -> dict:
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), *_BLOCK_ARGS_TAIL), desired_input_layouts=(Replicate(), *_BLOCK_ARGS_TAIL)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Parallelise `model` (a TransfusionModel or one pipeline stage of it) in place over tp_mesh."""
    plan: dict = {}
    layer_ids = list(model.layers.keys())
    if getattr(model, "tok_embeddings", None) is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        # The first block receives the full embedded sequence and keeps its own sequence shard.
        plan[f"layers.{layer_ids[0]}"] = PrepareModuleInput(
            input_layouts=(Replicate(), *_BLOCK_ARGS_TAIL),
            desired_input_layouts=(Shard(1), *_BLOCK_ARGS_TAIL),
            use_local_output=True,
        )
    if getattr(model, "norm", None) is not None:
        plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
        # patch_decoder(h, is_image, timesteps, skips): hand it the whole sequence.
        plan["patch_decoder"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        )
    parallelize_module(model, tp_mesh, plan)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan())
