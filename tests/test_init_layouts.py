"""Initial weights do not depend on the layout: every layout built on the meta device
(`parallel.meta_init`) starts from exactly the one-process model's weights (gloo ranks on CPU), and
no two parameters share their random numbers (pipeline stages of the same structure included)."""

from __future__ import annotations

import functools

import pytest
import torch

from model import TransfusionModel
from tests.parallel_worker import initial_weights, layout_config, merged, spawn_jobs

META = ["parallel.meta_init=true"]
EIGHT_LAYERS = ["model.n_layers=8", "train.grad_accum=4"]  # pp4 with two stages per rank
LAYOUTS = {
    2: {
        "tp2": ["parallel.tp=2"],
        "fsdp2_unet": ["parallel.dp_shard=2", "model.patch_codec=unet"],
        "pp2_gpipe": ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
        "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
        "pp2_interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
        "pp2_zero_bubble": ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"],
    },
    4: {
        "pp4_1f1b": ["parallel.pp=4", "parallel.pp_schedule=1f1b", *EIGHT_LAYERS],
        "pp4_interleaved": ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", *EIGHT_LAYERS],
        "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
        "tp2_fsdp2": ["parallel.tp=2", "parallel.dp_shard=2"],
    },
}


@functools.cache
def layout_weights(world: int, tmp: str) -> dict:
    return spawn_jobs(world, initial_weights, [(n, META + o) for n, o in LAYOUTS[world].items()], tmp)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("init"))


@pytest.mark.parametrize("world, name", [(w, n) for w, ls in LAYOUTS.items() for n in ls])
def test_initial_weights_match_one_process(world, name, results_dir):
    overrides = LAYOUTS[world][name]
    weights = merged(layout_weights(world, results_dir)[name])
    cfg = layout_config([o for o in overrides if not o.startswith("parallel.")])
    want = TransfusionModel(cfg.model, cfg.train.seed).state_dict()
    assert weights.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(weights[key], value), f"{name}: {key} differs from the one-process model"
    if name.startswith("pp"):
        assert_no_shared_numbers(weights)


def assert_no_shared_numbers(params: dict[str, torch.Tensor]) -> None:
    """No two randomly initialised tensors of the same shape are equal (norms start at ones by rule)."""
    seen: dict[tuple, str] = {}
    for key, t in params.items():
        if t.unique().numel() == 1:
            continue
        fingerprint = (tuple(t.shape), tuple(t.flatten()[:8].tolist()))
        assert fingerprint not in seen, f"{key} starts equal to {seen[fingerprint]}"
        seen[fingerprint] = key
