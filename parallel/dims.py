"""Process-group set-up and the one DeviceMesh `(dp_replicate, dp_shard, pp, tp)` all layouts share.

Tensor-parallel ranks are innermost (fastest links, inside a node), then pipeline stages, then data
parallelism. The ranks of one model replica (pp x tp) are therefore consecutive and share one
data-parallel rank, which is what the data loader partitions by.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
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


def resolve_device(name: str, environ: Mapping[str, str] = os.environ, cuda_devices: int | None = None) -> torch.device:
    """This process's device for `train.device=name` (auto | cpu | cuda | cuda:N).

    Under a launcher every process gets its own GPU: `cuda` (and `auto` with GPUs visible) means
    `cuda:LOCAL_RANK`. `environ` and `cuda_devices` (default: this process's) are parameters so the
    rule can be checked without a GPU.
    """
    n = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if name == "auto":
        name = "cuda" if n > 0 else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type != "cuda":
        raise ConfigError(f"train.device={name} is not one of auto, cpu, cuda, cuda:N")
    if n == 0:
        raise ConfigError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    world, local = int(environ.get("WORLD_SIZE", "1")), int(environ.get("LOCAL_RANK", "0"))
    if dev.index is not None and world > 1:
        raise ConfigError(f"train.device={name} would put all {world} processes on one GPU; use train.device=cuda "
                          "(each process takes cuda:LOCAL_RANK)")
    index = local if dev.index is None else dev.index
    if index >= n:
        raise ConfigError(f"this process needs cuda:{index} (LOCAL_RANK={local}) but {n} CUDA device(s) are visible; "
                          "start at most that many processes per node (torchrun --nproc-per-node) or check "
                          "CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def init_distributed(dims: ParallelDims, device_type: str = "auto", timeout_s: int = 1800,
                     one_rank_mesh: bool = False) -> DistEnv:
    """This process's device (`resolve_device(device_type)`, made current), the default process
    group (NCCL bound to that device, or gloo on CPU) and the mesh.

    A single process (world size 1) gets no process group and no mesh, unless `one_rank_mesh`
    (bf16 training wraps even one rank in FSDP2, see parallel.parallelize.wraps_fsdp): then a one-rank
    group over an in-process store, which the caller destroys (trainer.train.main does).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != dims.world_size:
        raise ConfigError(
            f"launched {world} processes but the layout pp*dp_replicate*dp_shard*tp = "
            f"{dims.pp}*{dims.dp_replicate}*{dims.dp_shard}*{dims.tp} = {dims.world_size}"
        )
    device = resolve_device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and not one_rank_mesh:
        return DistEnv(dims, None, device, 0, 0)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        # device_id binds the NCCL communicator to this GPU (eager init, no implicit device 0).
        group = {"timeout": datetime.timedelta(seconds=timeout_s), "device_id": device if cuda else None}
        if world == 1:  # no launcher, no rendezvous: nothing to reach but itself
            group.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if cuda else "gloo", **group)
    return mesh_env(dims, device)


def mesh_env(dims: ParallelDims, device: torch.device) -> DistEnv:
    """The DistEnv of this rank over the initialised default process group: the mesh in MESH_DIMS
    order and the flattened data-parallel mesh."""
    mesh = init_device_mesh(
        device.type, (dims.dp_replicate, dims.dp_shard, dims.pp, dims.tp), mesh_dim_names=MESH_DIMS
    )
    dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    return DistEnv(dims, mesh, device, dist.get_rank(), dp_mesh.get_local_rank(), dp_mesh)
