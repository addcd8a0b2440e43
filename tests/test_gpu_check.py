"""benchmarks/gpu_check.py end to end on CPU (`--cpu-smoke`: the plumbing, no performance meaning),
and its one-line refusal without a GPU. ~30 s on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(REPO)}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def test_cpu_smoke_writes_every_section_with_numbers(tmp_path):
    res = gpu_check("--cpu-smoke", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["note"] == "cpu-smoke: no performance meaning"
    assert "cpu-smoke: no performance meaning" in (tmp_path / "gpu_check.md").read_text()

    kt = report["kernel_tests"]  # interpreted, one selection
    assert kt["passed"] >= 1 and kt["failed"] == kt["errors"] == 0 and "TRITON_INTERPRET=1" in kt["command"]

    at = report["attention"]
    assert len(at["cases"]) == 4 and {c["seq_len"] for c in at["cases"]} == {64, 128}
    for case in at["cases"]:
        assert case["document_causal"] == (case["image_attention"] == "causal")
        assert number(case["forward_gflop"]) and case["forward_gflop"] > 0
        b = case["backends"]
        for name, modes in (("sdpa", ("forward", "forward_backward")), ("triton", ("forward", "forward_backward")),
                            ("flex", ("forward",))):
            for mode in modes:
                e = b[name][mode]
                assert e["status"] == "ok", (name, mode, e)
                assert number(e["ms"]) and e["ms"] > 0 and number(e["tflops"]) and e["tflops"] > 0
                assert number(e["speedup_vs_sdpa"])
                if name != "sdpa":
                    assert e["max_err_vs_sdpa"] < 1e-4  # fp32 on CPU
        # What cannot run here is reported with the probe's reason, not a crash.
        assert b["flex"]["forward_backward"]["status"] == "unavailable"
        assert "backward on CPU" in b["flex"]["forward_backward"]["reason"]
        assert all(b["flash"][m]["status"] == "unavailable" and "CUDA" in b["flash"][m]["reason"]
                   for m in ("forward", "forward_backward"))

    tr = report["training"]
    m, plan = tr["measured"], tr["planner"]
    assert tr["config"] == "configs/tiny.yaml" and m["steps"] >= 1
    for key in ("step_s", "tokens_per_s", "model_tflops_per_s", "first_loss", "last_loss"):
        assert number(m[key]) and m[key] > 0, key
    assert m["peak_memory_gib"] is None and m["mfu"] is None  # no GPU figure that was not measured
    for key in ("peak_memory_gib", "step_s", "tokens_per_s", "model_tflops_per_s", "mfu"):
        assert number(plan[key]) and plan[key] > 0, key
        assert tr["comparison"][key]["predicted"] == plan[key]
    assert number(tr["comparison"]["tokens_per_s"]["ratio"])
    assert (tmp_path / "train_tiny" / "metrics.jsonl").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    res = gpu_check("--out", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip() == "gpu_check needs a CUDA GPU (none is visible); --cpu-smoke checks the plumbing on CPU"
    assert not (tmp_path / "gpu_check.json").exists()
