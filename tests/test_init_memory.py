"""A 7B rank at 128 ranks materialises only its shard at init (fake tensors, fake process group):
with `parallel.meta_init` it never holds the whole model, as it does without (planner/init_memory.py)."""

from __future__ import annotations

import pytest
import torch

from config import load_config
from model import TransfusionModel
from planner.init_memory import init_memory

WORLD = 128


@pytest.fixture(scope="module")
def cfg_7b():
    cfg = load_config("configs/7b.yaml", ["data.source=synthetic", "logging.wandb=disabled"])
    cfg.parallel = cfg.parallel.resolved(WORLD)
    return cfg


def test_7b_rank_materialises_only_its_shard(cfg_7b):
    with torch.device("meta"):
        full_bytes = TransfusionModel(cfg_7b.model).num_params() * 4  # fp32
    before = init_memory(cfg_7b, 0, meta_init=False)
    after = init_memory(cfg_7b, 0, meta_init=True)
    # Both end holding the same shard: between 1/128 (tp 2 x dp_shard 64) and 1/64 of the model
    # (what tensor parallelism does not split, the patch codecs and norms, is split 64 ways only).
    assert before.held_bytes == after.held_bytes
    assert full_bytes / WORLD <= after.held_bytes <= full_bytes / (WORLD // 2)
    assert before.peak_bytes >= full_bytes  # the whole fp32 model, on every rank
    # With meta_init: the shard plus transient full copies of one parameter (to_empty, the draw).
    assert after.peak_bytes <= after.held_bytes + 4 * after.largest_parameter_bytes
    assert after.peak_bytes < before.peak_bytes / 10
