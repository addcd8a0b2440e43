"""Every parallel layout trains, and evaluates on the held-out set, like one process running the plain
model (gloo ranks on CPU).

Layouts of one world size run in one spawned process group, one after another. The reference is
the plain model in this process with grad_accum = dp * grad_accum over the same micro-batches and
the same diffusion noise, which is exactly what data parallelism averages.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.parallel_worker import assert_same_evals, layout_config, merged, run_training, spawn_jobs

LOSS_RTOL = 1e-5
PARAM_ATOL, PARAM_RTOL = 2e-5, 1e-4

LAYOUTS = {
    2: {
        "fsdp2": ["parallel.dp_shard=2"],
        "zero2_fsdp2": ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"],
        "fsdp2_sync_every_micro": ["parallel.dp_shard=2", "parallel.grad_sync=every_micro_batch"],
        "tp2_sp": ["parallel.tp=2"],
        "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
        "pp2_interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
        "pp2_zero_bubble": ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"],
        "pp2_gpipe_unet": ["parallel.pp=2", "parallel.pp_schedule=gpipe", "model.patch_codec=unet"],
        "fsdp2_unet_ac": ["parallel.dp_shard=2", "model.patch_codec=unet", "parallel.activation_checkpoint=full"],
    },
    4: {
        "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
        "tp2_fsdp2": ["parallel.tp=2", "parallel.dp_shard=2"],
        "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
    },
}


@functools.cache
def layout_results(world: int, tmp: str) -> dict:
    return spawn_jobs(world, run_training, list(LAYOUTS[world].items()), tmp)


@functools.cache
def reference(overrides: tuple[str, ...], dp: int) -> dict:
    cfg = layout_config([o for o in overrides if not o.startswith("parallel.")] +
                        [o for o in overrides if o.startswith("parallel.activation")])
    cfg.train.grad_accum *= dp
    return run_training(cfg)


def dp_size(overrides: list[str]) -> int:
    dims = {o.split("=")[0].split(".")[1]: int(o.split("=")[1]) for o in overrides
            if o.split("=")[0] in ("parallel.dp_shard", "parallel.dp_replicate")}
    return dims.get("dp_shard", 1) * dims.get("dp_replicate", 1)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parallel"))


@pytest.mark.parametrize("world, name", [(w, n) for w, ls in LAYOUTS.items() for n in ls])
def test_layout_matches_single_process(world, name, results_dir):
    overrides = LAYOUTS[world][name]
    ranks = layout_results(world, results_dir)[name]
    params = merged(ranks, "params")
    ref = reference(tuple(overrides), dp_size(overrides))
    ref_losses, ref_params = ref["losses"], ref["params"]
    for r, res in enumerate(ranks):
        assert res["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL), f"rank {r} losses"
        assert_same_evals(res["evals"], ref["evals"], LOSS_RTOL, f"rank {r}")
    assert params.keys() == ref_params.keys()
    for key, want in ref_params.items():
        torch.testing.assert_close(params[key], want, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=lambda m: f"{key}: {m}")
