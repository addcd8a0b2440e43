"""Gradient clipping: the global norm over sharded/replicated/pipelined gradients with one collective
per mesh dim (parallel/grad_clip.py), checked on spawned gloo ranks against the full gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.grad_clip import clip_grad_norm
from tests.parallel_worker import spawn_jobs


def _clip_job(cfg, env, max_norm: float) -> dict:  # noqa: ANN001
    """Build the layout, give every parameter a known gradient, clip; report norms and call counts."""
    from trainer.train import make_engine

    engine = make_engine(cfg, env)
    params = [p for part in engine.parts for p in part.parameters()]
    for p in params:
        g = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).sin() + 0.5
        if isinstance(p, DTensor):
            g = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
        p.grad = g
    full_before = {id(p): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone() for p in params}
    calls = []
    orig = dist.all_reduce

    def counting(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(tensor.numel())
        return orig(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        norm = clip_grad_norm(params, max_norm, env.group("pp") if env.dims.pp > 1 else None)
    finally:
        dist.all_reduce = orig
    # Reference: the squared norm of this rank's full (unsharded) gradients, summed over pp stages.
    ref_sq = torch.tensor(sum(float(v.double().pow(2).sum()) for v in full_before.values()))
    if env.dims.pp > 1:
        dist.all_reduce(ref_sq, group=env.group("pp"))
    ratios = [float((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).norm() / full_before[id(p)].norm())
              for p in params]
    return {"norm": float(norm), "ref": float(ref_sq.sqrt()), "calls": len(calls), "ratios": ratios}


@pytest.mark.slow
def test_clip_matches_full_gradients_with_one_collective_per_dim(tmp_path):
    jobs = [
        ("tp2_fsdp2", ["parallel.tp=2", "parallel.dp_shard=2"], 0.5),
        ("pp2_tp2", ["parallel.pp=2", "parallel.tp=2"], 0.5),
    ]
    results = spawn_jobs(4, _clip_job, jobs, str(tmp_path))
    # Collectives: tp2_fsdp2 reduces over dp_shard and tp; pp2_tp2 over tp and pp.
    expected_calls = {"tp2_fsdp2": 2, "pp2_tp2": 2}
    for name, ranks in results.items():
        for r in ranks:
            assert "error" not in r, r.get("error")
            assert abs(r["norm"] - r["ref"]) <= 1e-4 * r["ref"], (name, r["norm"], r["ref"])
            assert r["calls"] == expected_calls[name], (name, r["calls"])
            scale = min(1.0, jobs[[j[0] for j in jobs].index(name)][2] / r["ref"])
            assert all(abs(x - scale) < 1e-4 for x in r["ratios"]), name
        assert len({round(r["norm"], 4) for r in ranks}) == 1  # every rank takes the same decision


def test_clip_single_process_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours = clip_grad_norm(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
