"""Process-group set-up and the one DeviceMesh `(dp_replicate, dp_shard, pp, tp)` all layouts share.

Tensor-parallel ranks are innermost (fastest links, inside a node), then pipeline stages, then data
parallelism. The ranks of one model replica (pp x tp) are therefore consecutive and share one
data-parallel rank, which is what the data loader partitions by.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from config import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "tp")


@dataclass
class ParallelDims:
    """Sizes of the mesh dims; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, pcfg) -> "ParallelDims":
        """From a resolved trainer ParallelConfig (no -1 left)."""
        return cls(pp=pcfg.pp, dp_replicate=pcfg.dp_replicate, dp_shard=pcfg.dp_shard, tp=pcfg.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class DistEnv:
    """What a rank needs to know about the layout it runs in."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    device: torch.device
    rank: int
    dp_rank: int  # which data shard this rank reads (same for all tp/pp ranks of one replica)
    dp_mesh: DeviceMesh | None = None  # the flattened (dp_replicate, dp_shard) mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """Process group of one mesh dim (or of the flattened 'dp' dim); None when single-process."""
        if self.mesh is None:
            return None
        if dim == "dp":
            return self.dp_mesh.get_group()
        return self.mesh[dim].get_group()


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(dims: ParallelDims, device_type: str | None = None, timeout_s: int = 1800) -> DistEnv:
    """Initialise the default process group (NCCL on GPU, gloo on CPU) and build the mesh.

    Single-process runs (world size 1) get no process group and no mesh.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != dims.world_size:
        raise ConfigError(
            f"launched {world} processes but the layout pp*dp_replicate*dp_shard*tp = "
            f"{dims.pp}*{dims.dp_replicate}*{dims.dp_shard}*{dims.tp} = {dims.world_size}"
        )
    device = device_for_rank() if device_type is None else torch.device(device_type)
    if world == 1:
        return DistEnv(dims, None, device, 0, 0)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return mesh_env(dims, device)


def mesh_env(dims: ParallelDims, device: torch.device) -> DistEnv:
    """The DistEnv of this rank over the initialised default process group: the mesh in MESH_DIMS
    order and the flattened data-parallel mesh."""
    mesh = init_device_mesh(
        device.type, (dims.dp_replicate, dims.dp_shard, dims.pp, dims.tp), mesh_dim_names=MESH_DIMS
    )
    dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    return DistEnv(dims, mesh, device, dist.get_rank(), dp_mesh.get_local_rank(), dp_mesh)
