"""Gradient-norm clipping over a model split across every mesh dim (dp, tp and pipeline stages).

Squared norms are summed locally, bucketed by the set of mesh dims a gradient is sharded on, and
reduced with one all-reduce per mesh dim (plus one over the pipeline group), whatever the number of
parameters: a gradient replicated on a dim is counted by that dim's first rank only, so every bucket
can ride in the same fixed-length vector through every dim's reduction.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate


def _local(g: torch.Tensor) -> torch.Tensor:
    return g._local_tensor if isinstance(g, DTensor) else g


def _sharded_dims(g: torch.Tensor) -> frozenset[str]:
    """Names of the mesh dims `g` is split over (Partial is reduced away beforehand)."""
    if not isinstance(g, DTensor):
        return frozenset()
    names = g.device_mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(g.device_mesh.ndim))
    # Shard and _StridedShard (FSDP over a tensor-parallel dim) both split the tensor.
    return frozenset(n for n, p in zip(names, g.placements) if not (p.is_replicate() or p.is_partial()))


@torch.no_grad()
def grad_norm_sq_buckets(grads: list[torch.Tensor]) -> tuple[dict[str, dist.ProcessGroup], dict[frozenset[str], torch.Tensor]]:
    """Local squared-norm sums per set of sharded mesh dims, and the process group of every dim seen."""
    groups: dict[str, dist.ProcessGroup] = {}
    buckets: dict[frozenset[str], torch.Tensor] = {}
    for g in grads:
        if isinstance(g, DTensor):
            if any(isinstance(p, Partial) for p in g.placements):
                g = g.redistribute(placements=[Replicate() if isinstance(p, Partial) else p for p in g.placements])
            names = g.device_mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(g.device_mesh.ndim))
            for i, n in enumerate(names):
                groups.setdefault(n, g.device_mesh.get_group(i))
        key = _sharded_dims(g)
        sq = torch.linalg.vector_norm(_local(g), dtype=torch.float32).pow(2)
        buckets[key] = buckets[key] + sq if key in buckets else sq
    return groups, buckets


@torch.no_grad()
def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm (inf = no clipping); returns the norm.

    Collectives: one all-reduce per mesh dim the gradients live on, plus one over pp_group (pipeline
    stages hold disjoint parameters, so their squared norms add up).
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = _local(grads[0]).device if grads else torch.device("cpu")
    groups, buckets = grad_norm_sq_buckets(grads)
    dims = sorted(groups)
    # Every rank builds the same vector layout: one slot per subset of the dims seen.
    subsets = [frozenset(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    vec = torch.zeros(len(subsets), dtype=torch.float32, device=device)
    for i, s in enumerate(subsets):
        if s in buckets:
            vec[i] = buckets[s].to(device)
    for d in dims:
        group = groups[d]
        if dist.get_world_size(group) == 1:
            continue
        first = dist.get_rank(group) == 0
        keep = torch.tensor([1.0 if (d in s or first) else 0.0 for s in subsets], device=device)
        vec = vec * keep  # replicated on d: only d's first rank contributes
        dist.all_reduce(vec, group=group)
    total_sq = vec.sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm) and grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        locals_ = [_local(g) for g in grads]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in locals_:
            by_device.setdefault(t.device, []).append(t)
        for dev, ts in by_device.items():
            torch._foreach_mul_(ts, coef.to(dev))
    return total
