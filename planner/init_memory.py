"""What one rank materialises while it builds its share of the model, measured on fake tensors.

    python -m planner.init_memory --config configs/7b.yaml --world-size 128 [--rank R] [overrides]

Runs the trainer's own `make_engine` (model construction, `parallelize()`, and with
`parallel.meta_init` the meta-device build, `to_empty` and the per-parameter initialisation of
model/init.py) for one rank on fake tensors over a fake process group of the full world size, under
torch's memory tracker, once with `parallel.meta_init` off and once on. Off, every rank holds the
whole fp32 model before sharding it (on the host, in a real run); on, it holds its shard plus one
full parameter at a time while that parameter is drawn.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import Config, load_config
from model import TransfusionModel
from model.init import local_tensor
from parallel.dims import ParallelDims, mesh_env
from trainer.train import make_engine

from . import torch_internals as ti
from .hardware import GiB
from .runtime import RealShadow


@dataclass
class InitMemory:
    """Bytes one rank allocates while building its share of the model."""

    meta_init: bool
    peak_bytes: int  # the most held at once during the build
    held_bytes: int  # this rank's parameters afterwards (its shards)
    largest_parameter_bytes: int  # the largest full parameter of the model


def init_memory(cfg: Config, rank: int, meta_init: bool) -> InitMemory:
    """Measure `make_engine` for `rank` of cfg.parallel (resolved to its world size) with meta_init on or off."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel = dataclasses.replace(cfg.parallel, meta_init=meta_init, compile=False)
    cfg.train.device = "cpu"
    dims = ParallelDims.from_config(cfg.parallel)
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=ti.FakeStore())
    try:
        env = mesh_env(dims, torch.device("cpu"))
        fake = ti.FakeTensorMode()
        tracker = ti.peak_only(None, None)
        with fake, RealShadow(fake), ti.fake_parallelize(), tracker:
            engine = make_engine(cfg, env)
        held = sum(local_tensor(p).numel() * p.element_size() for part in engine.parts for p in part.parameters())
        del engine
    finally:
        dist.destroy_process_group()
    peaks = tracker.get_tracker_snapshot("peak")
    peak = max((int(snap.get("Total", 0)) for dev, snap in peaks.items() if torch.device(dev).type != "meta"), default=0)
    return InitMemory(meta_init, peak, held, _largest_parameter_bytes(cfg))


def _largest_parameter_bytes(cfg: Config) -> int:
    with torch.device("meta"):
        model = TransfusionModel(cfg.model)
    return max(p.numel() * 4 for p in model.parameters())  # drawn in fp32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, ["data.source=synthetic", "logging.wandb=disabled", *args.overrides])
    cfg.parallel = cfg.parallel.resolved(args.world_size)
    for meta in (False, True):
        m = init_memory(cfg, args.rank, meta)
        print(f"parallel.meta_init={str(meta).lower():5s}  rank {args.rank} of {args.world_size}: peak "
              f"{m.peak_bytes / GiB:7.2f} GiB while building, holds {m.held_bytes / GiB:6.2f} GiB of parameters "
              f"after (largest full parameter {m.largest_parameter_bytes / GiB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
