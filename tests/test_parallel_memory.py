"""Parameter + optimizer-state bytes per rank shrink with dp_shard (ZeRO-3) and with tp.

Measured on the real tensors each rank holds after one optimizer step (so AdamW's exp_avg and
exp_avg_sq exist): the optimizer's parameters and state, DTensors counted by `to_local()`. The
reference is one process training the plain model.

Tolerances: FSDP(N) per-rank bytes / one-process bytes = 1/N within 0.01 (absolute on the ratio;
what is left over is AdamW's per-parameter `step` scalars, which are not sharded, and any uneven
dim-0 split). TP(2): the sharded tensors (block matrices, vocab-parallel embedding and LM head)
hold half their bytes within 1%; the replicated ones (norms, patch codecs) hold all of theirs; the
whole is reported and must lie strictly between 1/2 and 1 of one process.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.parallel_worker import global_batches, layout_config, spawn_jobs

RATIO_TOL = 0.01
SHARD_RTOL = 0.01

LAYOUTS = {
    2: {"fsdp2": ["parallel.dp_shard=2"], "tp2": ["parallel.tp=2"]},
    4: {"fsdp4": ["parallel.dp_shard=4"]},
}


def _nbytes(t: torch.Tensor) -> int:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _full_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel() is its global size


def _is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)


def measure(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Local bytes of the optimizer's parameters and their state, split into sharded/replicated."""
    out = dict.fromkeys(
        ("param_sharded", "param_replicated", "state_sharded", "state_replicated", "param_sharded_full"), 0
    )
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = "sharded" if _is_sharded(p) else "replicated"
            out[f"param_{kind}"] += _nbytes(p)
            if kind == "sharded":
                out["param_sharded_full"] += _full_nbytes(p)
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    out[f"state_{kind}"] += _nbytes(value)
    out["total"] = out["param_sharded"] + out["param_replicated"] + out["state_sharded"] + out["state_replicated"]
    return out


def one_step(cfg, env=None) -> dict[str, int]:
    """Bytes of parameters + optimizer state on this rank after one training step."""
    from trainer.train import make_engine

    cfg.train.steps = 1
    engine = make_engine(cfg, env)
    dp, dp_rank, n = (env.dims.dp, env.dp_rank, cfg.train.grad_accum) if env else (1, 0, cfg.train.grad_accum)
    engine.train_step(global_batches(cfg, dp)[0][dp_rank * n : (dp_rank + 1) * n], 0)
    return measure(engine.optimizer)


@functools.cache
def layout_memory(world: int, tmp: str) -> dict:
    return spawn_jobs(world, one_step, list(LAYOUTS[world].items()), tmp)


@functools.cache
def single_process() -> dict[str, int]:
    return one_step(layout_config([]))


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("memory"))


def _ranks(world: int, name: str, results_dir: str) -> list[dict]:
    ranks = layout_memory(world, results_dir)[name]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return ranks


def _report(name: str, ranks: list[dict], ref: dict) -> None:
    for r, res in enumerate(ranks):
        print(f"{name} rank {r}: {res['total']} B of {ref['total']} B on one process "
              f"({res['total'] / ref['total']:.4f}); sharded params {res['param_sharded']} B, "
              f"replicated params {res['param_replicated']} B, "
              f"optimizer state {res['state_sharded'] + res['state_replicated']} B")


@pytest.mark.parametrize("world, name", [(2, "fsdp2"), (4, "fsdp4")])
def test_fsdp_zero3_shards_params_and_optimizer_state(world, name, results_dir):
    ranks, ref = _ranks(world, name, results_dir), single_process()
    _report(name, ranks, ref)
    # Every parameter is a dp shard; together the shards are exactly the model.
    assert sum(res["param_sharded"] for res in ranks) == ref["param_replicated"] + ref["param_sharded"]
    for r, res in enumerate(ranks):
        assert res["param_sharded_full"] == ref["param_replicated"], f"rank {r}: shards cover the model"
        ratio = res["total"] / ref["total"]
        assert abs(ratio - 1 / world) <= RATIO_TOL, f"rank {r}: params + optimizer state at {ratio:.4f} of one process"
        state_ratio = (res["state_sharded"] + res["state_replicated"]) / ref["state_replicated"]
        assert abs(state_ratio - 1 / world) <= RATIO_TOL, f"rank {r}: optimizer state at {state_ratio:.4f}"


def test_tp2_halves_the_sharded_tensors(results_dir):
    ranks, ref = _ranks(2, "tp2", results_dir), single_process()
    _report("tp2", ranks, ref)
    for r, res in enumerate(ranks):
        assert res["param_sharded"] == pytest.approx(res["param_sharded_full"] / 2, rel=SHARD_RTOL), f"rank {r}"
        # AdamW keeps two moments per element (+ scalar steps, counted as replicated).
        assert res["state_sharded"] == pytest.approx(2 * res["param_sharded"], rel=SHARD_RTOL), f"rank {r}"
        # The replicated tensors are whole on every rank, and sharded + replicated is the model.
        assert res["param_sharded_full"] + res["param_replicated"] == ref["param_replicated"], f"rank {r}"
        assert 0.5 < res["total"] / ref["total"] < 1.0, f"rank {r}"
    # The block matrices (the bulk at any real size) are among the sharded tensors.
    assert ranks[0]["param_sharded_full"] > ranks[0]["param_replicated"]
