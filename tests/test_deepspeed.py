"""DeepSpeed ZeRO-1/2/3 (`parallel.engine=deepspeed`) on 2 gloo ranks trains like one process.

Same harness as test_parallel.py: the layouts run one after another in one spawned 2-rank group;
the reference is the plain model in this process with grad_accum = 2 * grad_accum over the same
micro-batches and the same diffusion noise. Besides losses and final parameters, the gradient norm
the engine reports (before clipping) must equal the reference's.

The first DeepSpeed run on a machine compiles its `deepspeed_shm_comm` op with g++ (~1 min, cached
under ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch

from tests.parallel_worker import assert_same_evals, global_batches, layout_config, run_training, spawn_jobs
from parallel.engine import NonFiniteUpdate
from trainer.train import make_engine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install '.[deepspeed]')",
)

LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-5
PARAM_ATOL, PARAM_RTOL = 2e-5, 1e-4
WORLD = 2

DS = ["parallel.dp_shard=2", "parallel.engine=deepspeed"]
LAYOUTS = {
    "deepspeed_zero1": DS + ["parallel.deepspeed.zero_stage=1"],
    "deepspeed_zero2": DS + ["parallel.deepspeed.zero_stage=2"],
    # ZeRO-3 keeps parameters under 1e5 elements whole by default (all of the test model's): the
    # user JSON turns that off so every parameter is really partitioned, and exercises the merge.
    "deepspeed_zero3": DS + ["parallel.deepspeed.zero_stage=3", "parallel.deepspeed.config_json={json}"],
    # Optimizer state and step on CPU partitions (our torch AdamW steps them).
    "deepspeed_zero2_offload": DS + ["parallel.deepspeed.zero_stage=2", "parallel.deepspeed.offload_optimizer=true"],
    # Recomputed blocks under ZeRO-3's parameter gathering (recompute is exact: same reference).
    "deepspeed_zero3_ac": DS + ["parallel.deepspeed.zero_stage=3", "parallel.deepspeed.config_json={json}",
                                "parallel.activation_checkpoint=full"],
}
ZERO3_JSON = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@functools.cache
def ds_results(tmp: str) -> dict:
    json_path = f"{tmp}/zero3.json"
    with open(json_path, "w") as f:
        json.dump(ZERO3_JSON, f)
    layouts = [(n, [o.format(json=json_path) for o in ov]) for n, ov in LAYOUTS.items()]
    return spawn_jobs(WORLD, run_training, layouts, tmp)


@functools.cache
def reference() -> dict:
    """One process, plain model, grad_accum = 2 * 2 over the same micro-batches."""
    cfg = layout_config([])
    cfg.train.grad_accum *= WORLD
    return run_training(cfg)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("deepspeed"))


def test_config_mapping(tmp_path):
    """Our YAML maps onto the DeepSpeed config; a user JSON deep-merges on top."""
    from parallel.deepspeed_engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}))
    cfg = layout_config(DS + ["parallel.deepspeed.zero_stage=3", "parallel.deepspeed.offload_optimizer=true",
                              "train.dtype=bf16", f"parallel.deepspeed.config_json={user}"])
    ds = build_ds_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.batch_size == 2
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum == 2
    assert ds["gradient_clipping"] == 2.0  # user JSON wins
    assert ds["bf16"] == {"enabled": True}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["reduce_bucket_size"] == 1000
    assert "optimizer" not in ds and "scheduler" not in ds  # our AdamW + LambdaLR are passed in


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_deepspeed_matches_single_process(name, results_dir):
    ranks = ds_results(results_dir)[name]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    ref = reference()
    ref_losses, ref_norms, ref_params = ref["losses"], ref["grad_norms"], ref["params"]
    for r, res in enumerate(ranks):
        assert res["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL), f"rank {r} losses"
        assert res["grad_norms"] == pytest.approx(ref_norms, rel=GRAD_NORM_RTOL), f"rank {r} grad norms"
        assert_same_evals(res["evals"], ref["evals"], LOSS_RTOL, f"rank {r}")
        assert res["params"].keys() == ref_params.keys()
        for key, want in ref_params.items():
            torch.testing.assert_close(res["params"][key], want, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=key)


def poisoned_step(cfg, env) -> dict:
    """One step with a NaN weight: DeepSpeed cannot skip the update, so the trainer must stop."""
    engine = make_engine(cfg, env)
    with torch.no_grad():
        engine.parts[0].tok_embeddings.weight.fill_(float("nan"))
    per_rank = cfg.train.grad_accum
    batches = global_batches(cfg, env.dims.dp)[0][env.dp_rank * per_rank : (env.dp_rank + 1) * per_rank]
    try:
        engine.train_step(batches, 0)
    except NonFiniteUpdate as e:
        return {"stopped": str(e)}
    return {"stopped": None}


def test_non_finite_step_stops_the_run(tmp_path):
    ranks = spawn_jobs(WORLD, poisoned_step, [("nan", DS + ["parallel.deepspeed.zero_stage=2"])], str(tmp_path))["nan"]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        assert res["stopped"] is not None, f"rank {r} trained on"
        assert "under parallel.engine=deepspeed, which cannot skip the update" in res["stopped"]
