"""ZeRO/FSDP data parallelism with FSDP2 `fully_shard`: per block, HSDP across dp_replicate."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
    reshard_after_forward: bool = True, cpu_offload: bool = False,
) -> None:
    """Shard parameters, gradients and optimizer state over dp_mesh (1-D: FSDP; 2-D: HSDP).

    reshard_after_forward=True is ZeRO-3; False keeps parameters gathered between forward and
    backward (ZeRO-2-like: more memory, one all-gather fewer per block).
    """
    common = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for name in ("tok_embeddings", "patch_encoder"):
        if getattr(model, name, None) is not None:
            fully_shard(getattr(model, name), reshard_after_forward=reshard_after_forward, **common)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **common)
    if getattr(model, "patch_decoder", None) is not None:
        fully_shard(model.patch_decoder, reshard_after_forward=False, **common)
    # Root: the final norm and the LM head are gathered with the root group.
    fully_shard(model, reshard_after_forward=False, **common)
