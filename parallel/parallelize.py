"""Apply a layout to a plain TransfusionModel: TP/SP -> activation checkpointing -> compile -> FSDP,
inside each pipeline stage when pp > 1. The order follows torchtitan: tensor parallelism first so
FSDP shards the DTensor shards, FSDP last so it wraps the final modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from model.transfusion import TransfusionModel

from .activation import apply_activation_checkpointing, apply_compile
from .data_parallel import apply_fsdp
from .dims import DistEnv, ParallelDims
from .pipeline import build_pipeline
from .tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    """This rank's share of the model: one module, or its pipeline stages plus the schedule."""

    parts: list[nn.Module]
    schedule: object | None = None  # a torch.distributed.pipelining schedule when pp > 1
    has_last_stage: bool = True
    loss_parallel: bool = False

    def parameters(self) -> Iterator[nn.Parameter]:
        for part in self.parts:
            yield from part.parameters()

    def train(self) -> None:
        for part in self.parts:
            part.train()

    def set_gradient_sync(self, micro: int, n_micro: int, grad_sync: str) -> None:
        """Before micro-batch `micro` of `n_micro`: whether FSDP reduce-scatters its gradients after it
        (`parallel.grad_sync`: on the step's last micro-batch only, or after every one)."""
        enabled = grad_sync == "every_micro_batch" or micro == n_micro - 1
        for part in self.parts:
            if hasattr(part, "set_requires_gradient_sync"):
                part.set_requires_gradient_sync(enabled)


def place_shard(param: nn.Parameter, full: torch.Tensor) -> None:
    """Write this rank's slice of the full initial value into `param` (a DTensor: its local shard
    under any placements, FSDP's strided ones included; sliced locally, nothing communicated)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def wraps_fsdp(dims: ParallelDims, dtype: str) -> bool:
    """Whether FSDP2 wraps the model: to shard it over data-parallel ranks, and in bf16 always, since
    its MixedPrecisionPolicy (bf16 parameters in compute, fp32 master weights and gradient reduction)
    is the one bf16 policy of every layout; over a one-rank mesh it shards nothing, only casts."""
    return dims.dp > 1 or dtype == "bf16"


def parallelize(
    model: TransfusionModel, env: DistEnv, pcfg, dtype: str, n_microbatches: int, image_capacity: int,
    loss_fn: Callable | None = None,
) -> ParallelModel:
    """Split/shard `model` for the layout in `env` (pcfg: trainer ParallelConfig, resolved)."""
    dims = env.dims
    param_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    def wrap(module: nn.Module) -> None:
        if dims.tp > 1:
            apply_tensor_parallel(module, env.mesh["tp"], loss_parallel=True)
        apply_activation_checkpointing(module, pcfg.activation_checkpoint, pcfg.activation_checkpoint_every)
        if pcfg.compile:
            apply_compile(module)
        if wraps_fsdp(dims, dtype):
            if env.mesh is None:
                raise ValueError("bf16 training needs a process group, also on one process: build the DistEnv "
                                 "with parallel.dims.init_distributed(..., one_rank_mesh=True)")
            dp_mesh = env.mesh[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else env.mesh["dp_shard"]
            apply_fsdp(module, dp_mesh, param_dtype, torch.float32, pcfg.reshard_after_forward, pcfg.cpu_offload)
        if pcfg.meta_init:
            module.to_empty(device=env.device)
            module.init_weights(place_shard)
        else:
            module.to(env.device)

    if dims.pp > 1:
        pp_mesh = env.mesh["pp"]
        schedule, parts = build_pipeline(
            model, pp_mesh.get_local_rank(), dims.pp, pcfg.pp_schedule, pcfg.pp_virtual_stages,
            n_microbatches, image_capacity, loss_fn, env.device, pp_mesh.get_group(), wrap,
        )
        return ParallelModel(parts, schedule, any(p.is_last for p in parts), dims.tp > 1)
    wrap(model)
    return ParallelModel([model], None, True, dims.tp > 1)
