"""Gradient-norm clipping over a model split across every mesh dim (dp, tp and pipeline stages)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm (inf = no clipping).

    DTensor gradients (FSDP/TP shards) contribute their full norm via DTensor reductions; pipeline
    stages hold disjoint parameters, so their squared norms are summed over pp_group.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.to(total_sq.device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device) if not isinstance(g, DTensor) else coef.item())
    return total
