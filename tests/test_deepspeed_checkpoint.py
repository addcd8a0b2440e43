"""Checkpoints of the DeepSpeed engine: ZeRO-2 and ZeRO-3 runs on 2 gloo ranks saved at step 2
resume like the uninterrupted run, also on one rank (through DeepSpeed's universal checkpoint),
inference.convert consolidates them into exactly the weights the engine held, and the torch engine
refuses them with a message.

The first DeepSpeed run on a machine compiles its `deepspeed_shm_comm` op (see test_deepspeed.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from inference.convert import convert_checkpoint
from config import ConfigError
from tests.checkpoint_worker import train_with_checkpoints
from tests.parallel_worker import layout_config, spawn_jobs
from tests.helpers import checkpoint_manager
from trainer.train import make_engine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install '.[deepspeed]')",
)

STEPS = ["train.steps=4"]
DS = ["parallel.engine=deepspeed", *STEPS]
ZERO2 = [*DS, "parallel.dp_shard=2", "train.grad_accum=2", "parallel.deepspeed.zero_stage=2"]
ONE_RANK = [*DS, "train.grad_accum=4"]
ONE = ["train.grad_accum=4", *STEPS]


def spawn(world, jobs, out):
    """jobs: (name, overrides, save_at, resume); each saves into out/name."""
    results = spawn_jobs(world, train_with_checkpoints, [(n, o, str(out / n), s, r) for n, o, s, r in jobs], str(out))
    for name, ranks in results.items():
        for r, res in enumerate(ranks):
            assert "error" not in res, f"{name} rank {r}:\n{res['error']}"
    return {name: ranks[0] for name, ranks in results.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_ckpt")
    zero3_json = out / "zero3.json"  # partition every parameter, however small (see test_deepspeed.py)
    zero3_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    zero3 = [*DS, "parallel.dp_shard=2", "train.grad_accum=2", "parallel.deepspeed.zero_stage=3",
             f"parallel.deepspeed.config_json={zero3_json}"]
    first = spawn(2, [("zero2", ZERO2, 2, None), ("zero3", zero3, 2, None)], out)
    resumed = spawn(2, [
        ("zero2_resumed", ZERO2, None, str(out / "zero2" / "step_00000002")),
        ("zero3_resumed", zero3, None, str(out / "zero3" / "step_00000002")),
    ], out)
    one = spawn(1, [  # one rank: DeepSpeed re-partitions through its universal checkpoint
        ("zero2_one", [*ONE_RANK, "parallel.deepspeed.zero_stage=2"], None, str(out / "zero2" / "step_00000002")),
        ("zero3_one", [*ONE_RANK, "parallel.deepspeed.zero_stage=3"], None, str(out / "zero3" / "step_00000002")),
    ], out)
    reference = train_with_checkpoints(layout_config(ONE), None, str(out / "ref"), None, None)
    return {"out": out, **first, **resumed, **one, "reference": reference}


def test_resume_continues_the_uninterrupted_run(runs):
    ref = runs["reference"]["losses"]
    for stage in ("zero2", "zero3"):
        assert runs[stage]["losses"] == pytest.approx(ref, rel=1e-5), stage
        resumed = runs[f"{stage}_resumed"]["losses"]
        assert len(resumed) == 2  # steps 3 and 4
        assert resumed == pytest.approx(runs[stage]["losses"][2:], rel=1e-6), stage  # same layout: same run


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_checkpoint_of_two_ranks_resumes_on_one(runs, stage):
    # The partitions are re-cut (different summation order); a lost or misplaced optimizer state
    # would move step 4 by orders of magnitude more than this tolerance.
    assert runs[f"{stage}_one"]["losses"] == pytest.approx(runs["reference"]["losses"][2:], rel=3e-5)
    assert (runs["out"] / stage / "step_00000002" / "deepspeed_universal").is_dir()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_convert_consolidates_the_engine_weights(runs, stage, tmp_path):
    convert_checkpoint(runs["out"] / stage / "step_00000002", tmp_path / stage)
    converted = load_file(tmp_path / stage / "model.safetensors")
    held = runs[stage]["saved_params"]
    assert converted.keys() == held.keys()
    for name, t in held.items():
        assert torch.equal(converted[name], t), name


def test_torch_engine_refuses_a_deepspeed_checkpoint(runs):
    cfg = layout_config(ONE)
    folder = runs["out"] / "zero2" / "step_00000002"
    with pytest.raises(ConfigError) as e:
        checkpoint_manager(cfg, make_engine(cfg), folder.parent)[0].load(folder)
    msg = str(e.value)
    assert "was written by parallel.engine=deepspeed and resumes only with it" in msg
    assert "inference.convert" in msg

