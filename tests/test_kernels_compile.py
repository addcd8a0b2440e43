"""The Triton span-attention kernels compiled ahead of time for the GPUs they are for (no GPU needed).

The interpreter tests (tests/test_kernels_triton.py) skip Triton's compiler. Here every kernel
(forward, backward preprocess, dK/dV with atomic and with separate dQ, deterministic dQ) is compiled
for sm_90 (H100) and sm_80 (A100) through the real launch code, with the block sizes of
`default_blocks` and the num_warps / num_stages of `launch_options`, by benchmarks/kernel_resources.py
(a stand-in driver, `warmup` instead of a launch, ptxas from the triton wheel), in a subprocess
without TRITON_INTERPRET. Asserted for every configuration: it compiles; its shared memory fits the
architecture's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB, opt-in); the 16-bit kernels (the
training path) spill no registers. fp32 (numerics/reference only) may spill but must compile.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"forward", "preprocess", "dkdv+atomic_dq", "dkdv", "dq"}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is not installed")


def compile_rows(archs, dtypes, head_dims, groups) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--json",
           "--arch", *map(str, archs), "--dtype", *dtypes,
           "--head-dim", *map(str, head_dims), "--group", *map(str, groups)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def check(rows: list[dict], archs, dtypes, head_dims, groups) -> None:
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    seen = {(r["arch"], r["dtype"], r["head_dim"], r["group"], r["kernel"]) for r in rows}
    want = {(a, names[d], h, g, k) for a in archs for d in dtypes for h in head_dims for g in groups for k in KERNELS}
    assert seen == want, f"not compiled: {sorted(want - seen)}"
    too_big = [r for r in rows if r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not too_big, f"over the per-block shared memory limit: {too_big}"
    spills = [r for r in rows if r["dtype"] != "float32" and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "16-bit kernels spill registers:\n" + "\n".join(
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} d{r['head_dim']} group {r['group']}: "
        f"{r['regs']} regs, {r['spill_stores']} / {r['spill_loads']} B spilled" for r in spills)
    assert all(0 < r["regs"] <= 255 and r["warps_per_sm"] > 0 for r in rows)


def test_limits_are_the_cuda_per_block_opt_in_maxima():
    from benchmarks.kernel_resources import ARCHS, occupancy

    assert {a: lim.smem_per_block for a, lim in ARCHS.items()} == SMEM_LIMIT
    assert ARCHS[80].smem_per_sm == 164 * 1024 and ARCHS[90].smem_per_sm == 228 * 1024
    # 8 warps at 255 registers: 8 * 8192 of 65536 registers, one block; 4 warps at 128: 4 blocks.
    assert occupancy(255, 0, 8, ARCHS[90]) == (8, "regs")
    assert occupancy(128, 0, 4, ARCHS[90]) == (16, "regs")
    assert occupancy(32, 100 * 1024, 4, ARCHS[80]) == (4, "smem")


def test_bf16_d128_kernels_compile_for_sm80_and_sm90_without_spills():
    """The 7B shape (bf16, head dim 128), GQA groups 1 and 8 (the per-group dK/dV loop), both
    archs; 20 kernels, ~30 s on 2 CPU cores with a cold Triton cache, ~6 s warm."""
    args = ([90, 80], ["bf16"], [128], [1, 8])
    check(compile_rows(*args), *args)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_kernel_compiles_in_every_configuration(arch, dtype):
    """One arch and dtype x head dims 64/128 x GQA groups 1/4/8: 30 kernels; the six together ~9
    min on 2 CPU cores with a cold Triton cache (fp32, which spills, takes most of it)."""
    args = ([arch], [dtype], [64, 128], [1, 4, 8])
    check(compile_rows(*args), *args)
