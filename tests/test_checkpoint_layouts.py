"""Checkpoints do not depend on the layout: a run saved with FSDP(2) resumes with TP(2) and with one
process and continues like the uninterrupted run; FSDP(2), TP(2) and PP(2) checkpoints of the same
weights convert to identical inference folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from inference.convert import convert_checkpoint
from tests.checkpoint_worker import train_with_checkpoints
from tests.parallel_worker import layout_config, spawn_jobs

STEPS = ["train.steps=4"]
# The same global batch of 4 micro-batches per step in every layout.
FSDP2 = ["parallel.dp_shard=2", "train.grad_accum=2", *STEPS]
TP2 = ["parallel.tp=2", "train.grad_accum=4", *STEPS]
ONE = ["train.grad_accum=4", *STEPS]


def spawn(jobs, out):
    """jobs: (name, overrides, save_at, resume); each saves into out/name."""
    results = spawn_jobs(2, train_with_checkpoints, [(n, o, str(out / n), s, r) for n, o, s, r in jobs], str(out))
    for name, ranks in results.items():
        assert "error" not in ranks[0], f"{name}:\n{ranks[0]['error']}"
    return {name: ranks[0] for name, ranks in results.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_layouts")
    first = spawn([
        ("fsdp2", FSDP2, 2, None),  # saves step 2, keeps going to 4
        ("init_fsdp2", ["parallel.dp_shard=2"], 0, None),
        ("init_tp2", ["parallel.tp=2"], 0, None),
        ("init_pp2", ["parallel.pp=2"], 0, None),
    ], out)
    resumed = spawn([
        ("tp2_from_fsdp2", TP2, None, str(out / "fsdp2" / "step_00000002")),
        ("fsdp2_from_fsdp2", FSDP2, None, str(out / "fsdp2" / "step_00000002")),
    ], out)
    one = train_with_checkpoints(layout_config(ONE), None, str(out / "one"), None, str(out / "fsdp2" / "step_00000002"))
    reference = train_with_checkpoints(layout_config(ONE), None, str(out / "ref"), None, None)
    return {"out": out, "fsdp2": first["fsdp2"]["losses"], "tp2": resumed["tp2_from_fsdp2"]["losses"],
            "fsdp2_resumed": resumed["fsdp2_from_fsdp2"]["losses"], "one": one["losses"],
            "reference": reference["losses"]}


def test_fsdp_checkpoint_resumes_with_fsdp_tp_and_one_process(runs):
    ref = runs["reference"]
    assert runs["fsdp2"] == pytest.approx(ref, rel=1e-5)
    assert len(runs["tp2"]) == len(runs["one"]) == 2  # steps 3 and 4 after resuming at step 2
    assert runs["tp2"] == pytest.approx(ref[2:], rel=1e-5)
    assert runs["one"] == pytest.approx(ref[2:], rel=1e-5)
    assert runs["fsdp2_resumed"] == pytest.approx(runs["fsdp2"][2:], rel=1e-6)  # same layout: same run


def test_layouts_convert_to_identical_inference_folders(runs, tmp_path):
    tensors = {}
    for layout in ("fsdp2", "tp2", "pp2"):
        folder = tmp_path / layout
        convert_checkpoint(runs["out"] / f"init_{layout}" / "step_00000000", folder)
        tensors[layout] = load_file(folder / "model.safetensors")
    assert tensors["fsdp2"].keys() == tensors["tp2"].keys() == tensors["pp2"].keys()
    for name, t in tensors["fsdp2"].items():
        assert torch.equal(t, tensors["tp2"][name]) and torch.equal(t, tensors["pp2"][name]), name
