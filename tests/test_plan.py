"""The scale rehearsal planner (planner/plan.py): fake-mode steps of the real model and layouts.

Fast tests use the tiny config on a fake world of 8; the 7B layouts at world size 128 are `slow`.
Validation: the fake step's peak memory against a real CPU step of the trainer measured with torch's
MemTracker on real tensors in a separate process, and its FLOP count against model/flops.py's count
from the model's shapes and the batch's spans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from planner.plan import PLAN_DEFAULTS, eval_seconds, plan_layout
from planner.hardware import GPU
from tests.conftest import REPO
from config import load_config

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run_in_process(fn: str, *args: object) -> dict:
    """Run tests.helpers.<fn>(*args) in a fresh process (one fake process group per process)."""
    code = f"import json, tests.helpers as t; print(json.dumps(t.{fn}(*{args!r})))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY_LAYOUTS = {
    "fsdp8": (["parallel.dp_shard=-1"], {"dp"}),
    "tp2_fsdp4_ac": (["parallel.tp=2", "parallel.dp_shard=-1", "parallel.activation_checkpoint=full"], {"dp_shard", "tp"}),
    "pp2_tp2_1f1b": (["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=-1", "train.grad_accum=2"],
                     {"dp_shard", "tp", "pp"}),
}


@pytest.mark.parametrize("layout", sorted(TINY_LAYOUTS))
def test_tiny_layouts_on_a_fake_world_of_8(layout):
    overrides, dims = TINY_LAYOUTS[layout]
    s = _run_in_process("plan_fake_rank", "tiny.yaml", overrides, 8)
    assert s["peak_gib"] >= 0 and s["peak_bytes"] > 0
    assert s["memory_gib"].keys() == {"parameters", "gradients", "optimizer", "activations", "temporaries", "ema"}
    assert s["ema_bytes"] == 0  # train.ema_decay: 0
    assert set(s["collective_gib"]) == dims, s["collective_gib"]
    # Gradient clipping: one all-reduce per mesh dim the gradients live on (+ pp), not one per parameter.
    assert s["clip_all_reduces"] == len(dims), s["clip_all_reduces"]
    if "tp" in dims:
        assert {"all_gather", "reduce_scatter"} <= set(s["collective_gib"]["tp"])
    if "pp" in dims:
        assert {"send", "recv"} <= set(s["collective_gib"]["pp"])
    if "ac" in layout:
        assert s["matmul_tflops"]["recompute"] >= 0 and s["model_tflops_last_micro"] > 0


@pytest.mark.parametrize("name, overrides", [
    ("tiny.yaml", ["model.patch_codec=unet", "parallel.activation_checkpoint=full"]),
    pytest.param("160m.yaml", ["train.seq_len=512", "train.batch_size=2", "train.grad_accum=1"], marks=pytest.mark.slow),
])
def test_counted_flops_match_the_config_count(name, overrides):
    """Every matmul/conv of the fake step (recompute excluded) + span pairs = model/flops.py within 2%."""
    s = _run_in_process("plan_fake_rank", name, overrides, 1)
    measured, analytic = s["model_tflops_last_micro"], s["analytic_tflops_last_micro"]
    assert analytic > 0 and abs(measured - analytic) <= 0.02 * analytic, (measured, analytic)


@pytest.mark.parametrize("name, overrides", [
    ("tiny.yaml", ["train.grad_accum=1"]),
    pytest.param("160m.yaml", ["train.seq_len=512", "train.batch_size=2", "train.grad_accum=1"], marks=pytest.mark.slow),
])
def test_fake_peak_matches_a_real_cpu_step(name, overrides):
    """Planner (fake tensors, CPU attention path) vs the trainer's real step: peak within 15%."""
    fake = _run_in_process("plan_fake_rank", name, overrides, 1, 0, "sdpa")["peak_bytes"]
    real = _run_in_process("plan_real_step_peak", name, overrides)["peak_bytes"]
    assert abs(fake - real) <= 0.15 * real, (fake, real)


def test_bad_layout_is_a_one_line_config_error():
    out = subprocess.run([PY, "-m", "planner.plan", "--config", "configs/tiny.yaml", "--world-size", "8",
                          "parallel.tp=3"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: parallel.tp=3 does not divide model.n_heads=4"


def test_layout_that_cannot_fit_says_which_part_exceeds_what():
    small = GPU("test GPU", 1e12, 3.2e9, 1e12, 1e11, 1e10, "made up")
    cfg = load_config(REPO / "configs" / "tiny.yaml", PLAN_DEFAULTS + ["parallel.dp_shard=-1"])
    rep = plan_layout(cfg, 4, small)
    assert not rep.fits
    assert "GiB usable of test GPU" in rep.reason and "largest part:" in rep.reason
    assert rep.tokens_per_s_per_gpu > 0 and 0 < rep.mfu < 1


def test_sweep_ranks_layouts_and_writes_json(tmp_path):
    out_json = tmp_path / "sweep.json"
    out = subprocess.run(
        [PY, "-m", "planner.plan", "--config", "configs/tiny.yaml", "--sweep", "--gpus", "16", "--gpu", "h100",
         "--tp", "1,3", "--pp", "1", "--ac", "none", "--json", str(out_json)],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out_json.read_text())
    layouts = data["layouts"]
    ok = [x for x in layouts if not x["error"]]
    assert sorted(x["layout"]["dp_replicate"] for x in ok) == [1, 2]  # FSDP 16 and HSDP 2x8
    assert any("does not divide model.n_heads" in x["error"] for x in layouts)  # tp=3 reported, not a crash
    assert ok[0]["tokens_per_s_per_gpu"] >= ok[1]["tokens_per_s_per_gpu"]
    assert "tok/s/GPU" in out.stdout and data["gpu"]["name"] == "H100 SXM 80GB"


SEVEN_B = {
    "fsdp128": ["parallel.tp=1", "parallel.dp_shard=-1"],  # explicit tp: configs/7b.yaml's default is tp=2
    "hsdp8x16": ["parallel.tp=1", "parallel.dp_replicate=8", "parallel.dp_shard=16"],
    "tp8_fsdp16": ["parallel.tp=8", "parallel.dp_shard=16"],
    "tp4_pp4_1f1b_fsdp8": ["parallel.tp=4", "parallel.pp=4", "parallel.pp_schedule=1f1b", "parallel.dp_shard=8"],
    "tp4_pp4_interleaved_fsdp8": ["parallel.tp=4", "parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b",
                                  "parallel.dp_shard=8"],
    "tp2_pp2_fsdp32": ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("ac", ["none", "full"])
@pytest.mark.parametrize("layout", sorted(SEVEN_B))
def test_7b_layouts_at_world_128(layout, ac, tmp_path):
    """The 7B config at true shapes on 128 fake ranks, every pipeline stage: runs and reports."""
    out_json = tmp_path / "plan.json"
    out = subprocess.run(
        [PY, "-m", "planner.plan", "--config", "configs/7b.yaml", "--world-size", "128", "--gpu", "h100",
         "--json", str(out_json), *SEVEN_B[layout], f"parallel.activation_checkpoint={ac}"],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out_json.read_text())["layouts"][0]
    assert not rep["error"]
    pp = rep["layout"]["pp"]
    assert len(rep["ranks"]) == pp and sorted(s for r in rep["ranks"] for s in r["stages"])[0] == 0
    for r in rep["ranks"]:
        assert r["peak_gib"] > 0 and r["memory_gib"]["optimizer"] > 0
        if ac == "full":
            assert r["matmul_tflops"]["recompute"] > 0
    assert rep["step_s"] > 0 and 0 < rep["mfu"] < 1


def test_model_flops_per_token_for_the_trainer():
    """Same counting as the planner: per-token FLOPs of a real batch, and the text-only default."""
    from model.flops import batch_flops, model_flops_per_token, step_model_flops
    from trainer.hardware import gpu_for_device_name
    from trainer.data import build_loader

    cfg = load_config(REPO / "configs" / "tiny.yaml", PLAN_DEFAULTS)
    batch = next(build_loader(cfg))
    per_tok = model_flops_per_token(cfg.model, batch)
    assert per_tok * batch.tokens.numel() == pytest.approx(step_model_flops(cfg.model, [batch]))
    assert step_model_flops(cfg.model, [batch, batch]) == pytest.approx(2 * sum(f.total for f in batch_flops(cfg.model, batch).values()))
    m = cfg.model
    dense = 6 * (m.n_layers * (2 * m.d_model * m.n_heads * m.head_dim + 2 * m.d_model * m.kv_heads * m.head_dim
                               + 3 * m.d_model * m.hidden_dim) + m.d_model * m.vocab_size)
    S = cfg.train.seq_len
    attn = 12 * m.n_layers * m.n_heads * m.head_dim * (S + 1) / 2  # causal: (S + 1) / 2 keys per query
    assert model_flops_per_token(m, seq_len=S) == pytest.approx(dense + attn)
    assert gpu_for_device_name("NVIDIA H100 80GB HBM3").bf16_flops == 989e12
    assert gpu_for_device_name("Tesla T4") is None


def test_held_out_evaluation_costs_one_forward_per_evaluation_step():
    """eval.rows dealt in steps of dp x grad_accum x batch_size rows (20 rows / 16 -> 2 steps); a
    pipeline adds its forward-only fill and drain, (grad_accum + pp - 1) / grad_accum."""
    def cfg(*overrides: str):
        c = load_config(REPO / "configs" / "tiny.yaml", PLAN_DEFAULTS + ["train.batch_size=2", "train.grad_accum=2",
                                                                         "eval.every=100", "eval.rows=20", *overrides])
        c.parallel = c.parallel.resolved(4)
        return c

    assert eval_seconds(cfg("parallel.dp_shard=4"), forward_s=0.5) == pytest.approx(2 * 0.5)
    assert eval_seconds(cfg("parallel.dp_shard=2", "parallel.pp=2"), forward_s=0.5) == pytest.approx(3 * 0.5 * 1.5)


def test_ema_weights_are_counted_sharded_in_fp32():
    """train.ema_decay: an fp32 copy of this rank's parameter shards (FSDP over 8: an eighth, padding aside)."""
    import torch

    from model import TransfusionModel

    s = _run_in_process("plan_fake_rank", "tiny.yaml", ["parallel.dp_shard=-1", "train.ema_decay=0.999"], 8)
    with torch.device("meta"):
        n = sum(p.numel() for p in TransfusionModel(load_config(REPO / "configs" / "tiny.yaml", PLAN_DEFAULTS).model).parameters())
    assert s["ema_bytes"] == pytest.approx(4 * n / 8, rel=0.05)
