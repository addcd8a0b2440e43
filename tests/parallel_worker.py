"""Runs training layouts on spawned gloo ranks for the equivalence tests (see test_parallel.py)."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import Config, load_config
from trainer.data import build_loader
from trainer.evaluation import Evaluator
from trainer.train import make_engine, process_env

REPO = Path(__file__).resolve().parents[1]
# A small model that still has GQA, several layers for pipeline stages, and images in every row.
BASE = [
    "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=2", "train.grad_accum=2", "train.steps=3",
    "optim.warmup_steps=1", "optim.lr=1e-3", "optim.grad_clip=0.5", "logging.wandb=disabled",
    # Adam divides by sqrt(v) + eps: with eps 1e-8 a gradient element near 1e-9 turns summation-order
    # noise into visible parameter differences; 1e-6 keeps the comparison about the layouts.
    "optim.eps=1e-6",
    "checkpoint.enabled=false", "data.source=synthetic", "data.text_fraction=0.4", "train.device=cpu",
    "eval.every=0", "eval.rows=8",  # run_training evaluates itself: one held-out forward step at dp x grad_accum x batch_size = 8 rows
]


def layout_config(overrides: list[str]) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", BASE + overrides)


def global_batches(cfg: Config, dp: int) -> list[list]:
    """For each step, the dp * grad_accum micro-batches of the whole data-parallel group."""
    loader = build_loader(cfg)
    n = dp * cfg.train.grad_accum
    return [[next(loader) for _ in range(n)] for _ in range(cfg.train.steps)]


def rank_steps(engine, cfg: Config, env=None, after_step: Callable[[int], None] = lambda step: None) -> list:
    """Every step of `cfg.train.steps` on this rank's slice of the global batches (StepResults);
    `after_step(n)` runs after the n-th."""
    dp, dp_rank = (env.dims.dp, env.dp_rank) if env is not None else (1, 0)
    per_rank = cfg.train.grad_accum
    results = []
    for step, batches in enumerate(global_batches(cfg, dp)):
        results.append(engine.train_step(batches[dp_rank * per_rank : (dp_rank + 1) * per_rank], step))
        after_step(step + 1)
    return results


def run_training(cfg: Config, env=None) -> dict:
    """Train on this rank's slice of the global batches, evaluating on the held-out set after the first
    and the last step; per-step losses and grad norms, the evaluations' metrics, full params."""
    env = env or process_env(cfg)
    engine, evaluator, evals = make_engine(cfg, env), Evaluator(cfg, env), []

    def evaluate(step: int) -> None:
        if step in (1, cfg.train.steps):
            evals.append({k: v for k, v in evaluator.run(engine).items() if k != "eval/seconds"})

    results = rank_steps(engine, cfg, env, evaluate)
    sd = engine.full_state_dict()  # DeepSpeed gathers ZeRO-3 partitions; a pipeline rank gets its stages
    return {
        "losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results], "evals": evals,
        "params": {k: v.detach().cpu().clone() for k, v in sd.items()},
    }


def assert_same_evals(got: list[dict], want: list[dict], rel: float, who: str) -> None:
    """Held-out metrics (after the first and the last step) equal the one-process ones, key for key."""
    assert len(got) == len(want) == 2 and all(w.keys() == g.keys() for w, g in zip(want, got)), who
    assert want[0]["eval/diffusion_loss"] > 0 and want[0]["eval/caption_lm_loss"] > 0  # both measured
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=rel), f"{who} held-out metrics"


def initial_weights(cfg: Config, env=None) -> dict:
    """The full initial weights this rank holds (a pipeline rank: its stages), before any step."""
    return {k: v.detach().cpu().clone() for k, v in make_engine(cfg, env).full_state_dict().items()}


def merged(ranks: list[dict], key: str | None = None) -> dict:
    """One layout's per-rank results (each rank's dict, or its `key` entry) merged into one dict, after
    failing with the traceback of any rank that raised; pipeline ranks each hold their stages'
    parameters, so together they must cover the model."""
    out = {}
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        out.update(res if key is None else res[key])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(rank: int, world: int, port: int, job: Callable, jobs: list[tuple], out: str) -> None:
    """Body of each spawned gloo rank: for every (name, overrides, *args) build that layout and
    save `job(cfg, env, *args)` (or the traceback) to `out/name.rank{rank}.pt`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from trainer.train import process_env

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, overrides, *args in jobs:
        try:
            cfg = layout_config(overrides)
            cfg.parallel = cfg.parallel.resolved(world)
            env = process_env(cfg)  # the trainer's rule (one rank in bf16: a one-rank mesh)
            result = job(cfg, env, *args)
        except Exception:  # reported to the test, which fails with the traceback
            result = {"error": traceback.format_exc()}
        torch.save(result, Path(out) / f"{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def spawn_jobs(world: int, job: Callable, jobs: list[tuple], out: str) -> dict[str, list[dict]]:
    """Run `jobs` on `world` spawned ranks; return each job's per-rank results."""
    mp.start_processes(run_jobs, args=(world, free_port(), job, jobs, out), nprocs=world, start_method="spawn")
    return {name: [torch.load(Path(out) / f"{name}.rank{r}.pt", weights_only=True) for r in range(world)]
            for name, *_ in jobs}
