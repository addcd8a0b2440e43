"""One device per rank: train.device resolves to cuda:LOCAL_RANK under a launcher, the device is made
current and bound to the NCCL process group (checked without a GPU, with torchrun's variables)."""

from __future__ import annotations

import re

import pytest
import torch

import parallel.dims as dims_mod
from config import ConfigError
from parallel.dims import ParallelDims, init_distributed, resolve_device


def torchrun_env(local_rank: int, world: int, nproc: int = 8) -> dict[str, str]:
    """What torchrun sets for one process of `world` (nproc per node)."""
    return {"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_every_local_rank_gets_its_own_gpu(name):
    devices = {resolve_device(name, torchrun_env(r, 16), cuda_devices=8) for r in range(8)}
    assert devices == {torch.device("cuda", r) for r in range(8)}


def test_single_process_and_cpu():
    assert resolve_device("cuda", {}, cuda_devices=2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", {}, cuda_devices=2) == torch.device("cuda", 1)
    assert resolve_device("auto", torchrun_env(3, 8), cuda_devices=0) == torch.device("cpu")
    assert resolve_device("cpu", torchrun_env(3, 8), cuda_devices=8) == torch.device("cpu")


@pytest.mark.parametrize("name, env, n, message", [
    ("cuda", {}, 0, "no CUDA device is visible"),
    ("cuda", torchrun_env(8, 16, nproc=9), 8, "needs cuda:8 (LOCAL_RANK=8) but 8 CUDA device(s)"),
    ("cuda:1", torchrun_env(0, 8), 8, "would put all 8 processes on one GPU"),
    ("tpu", {}, 8, "not one of auto, cpu, cuda, cuda:N"),
])
def test_a_device_that_cannot_work_is_one_line(name, env, n, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        resolve_device(name, env, cuda_devices=n)
    assert "\n" not in str(e.value)


def test_init_distributed_sets_the_device_and_binds_it_to_nccl(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dims_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dims_mod.dist, "init_process_group",
                        lambda backend, **kw: calls.update(backend=backend, device_id=kw.get("device_id")))
    monkeypatch.setattr(dims_mod, "mesh_env", lambda d, device: device)
    for k, v in torchrun_env(5, 8).items():
        monkeypatch.setenv(k, v)
    device = init_distributed(ParallelDims(dp_shard=8), "cuda")
    assert device == torch.device("cuda", 5)
    assert calls == {"set_device": torch.device("cuda", 5), "backend": "nccl", "device_id": torch.device("cuda", 5)}
