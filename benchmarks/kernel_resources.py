"""Registers, spills, shared memory and occupancy of the span-attention kernels, compiled ahead of time.

Compiles every Triton span-attention kernel (forward, backward preprocess, dK/dV with atomic dQ and
without, deterministic dQ) for sm_80 (A100) and sm_90 (H100) on this machine, no GPU needed: the
real launch code (kernels.triton_span._launch_forward / _launch_backward, with the block sizes of
`default_blocks` and the num_warps / num_stages of `launch_options`) runs on CPU tensors against a
stand-in driver that reports the target GPU, and each kernel launch becomes `warmup` (compile, do
not run), so the kernels get the same specialisation (16-byte aligned pointers, unit strides,
sizes divisible by 16) as a real launch. Registers and spill bytes come from `ptxas -v` (the one
shipped in the triton wheel, with Triton's own flags) on the compiled PTX, shared memory from the
compiled kernel's metadata; occupancy is the theoretical number of resident warps per SM from
registers, shared memory and warps per block against the architecture's limits (ARCHS).

These are compiler figures, not measurements. Run: python -m benchmarks.kernel_resources
[--arch 80 90] [--dtype bf16 fp16 fp32] [--head-dim 64 128] [--group 1 4 8] [--json]
(prints one markdown table; --json prints the rows as JSON instead). Must run without
TRITON_INTERPRET (the kernels are then compiled, not interpreted). tests/test_kernels_compile.py
uses it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one GPU architecture (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability"; 1 KiB of each block's shared memory is reserved)."""

    name: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 0  # bytes, the largest carve-out
    smem_per_block: int = 0  # bytes, opt-in maximum for one block (dynamic shared memory)
    smem_reserved_per_block: int = 1024
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_alloc_unit: int = 128


ARCHS = {
    80: ArchLimits("sm_80 (A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: ArchLimits("sm_90 (H100)", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)
# Kernel names in the table: the Triton function and, for dK/dV, how dQ is produced.
KERNEL_ROWS = ("forward", "preprocess", "dkdv+atomic_dq", "dkdv", "dq")


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, shared: int, num_warps: int, limits: ArchLimits) -> tuple[int, str]:
    """Theoretical resident warps per SM and what limits them ("regs", "smem", "warps", "blocks")."""
    regs_per_warp = _round_up(max(regs, 1) * 32, limits.reg_alloc_unit)
    by = {
        "regs": (limits.regs_per_sm // regs_per_warp) // num_warps,
        "smem": limits.smem_per_sm
        // (_round_up(shared, limits.smem_alloc_unit) + limits.smem_reserved_per_block),
        "warps": limits.max_warps_per_sm // num_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    return blocks * num_warps, limiter


class _StandInDriver:
    """Enough of a Triton driver for `JITFunction.warmup`: the target and a device/stream id. The
    device id is the arch, so each target gets its own JIT cache."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):  # noqa: ANN201
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


class _Compiling:
    """Stands in for a @triton.jit kernel in its module: `kernel[grid](*args)` compiles (warmup)
    and records the compiled kernel instead of launching it."""

    def __init__(self, name: str, jit: Any, sink: list) -> None:
        self.name, self.jit, self.sink = name, jit, sink

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def compile_only(*args: Any, **kwargs: Any) -> None:
            self.sink.append((self.name, kwargs, self.jit.warmup(*args, grid=grid, **kwargs)))

        return compile_only


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`, run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
            capture_output=True, text=True, check=True,
        )
    log = res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(regs.group(1)), int(stores.group(1)), int(loads.group(1))


def _row_name(name: str, kwargs: dict) -> str:
    return {
        "span_fwd_kernel": "forward",
        "span_bwd_preprocess_kernel": "preprocess",
        "span_bwd_q_kernel": "dq",
    }.get(name) or ("dkdv+atomic_dq" if kwargs["ATOMIC_DQ"] else "dkdv")


def compile_config(arch: int, dtype: torch.dtype, head_dim: int, group: int) -> list[dict[str, Any]]:
    """Compile every kernel of one configuration for `arch`; one dict per kernel (KERNEL_ROWS)."""
    import triton

    from kernels import triton_span as ts
    from kernels import triton_span_bwd as bwd
    from kernels import triton_span_fwd as fwd
    from kernels.spans import key_block_bounds

    if ts.interpreter_requested():
        raise RuntimeError("benchmarks.kernel_resources compiles the kernels: unset TRITON_INTERPRET")
    compiled: list = []
    names = ((fwd, "span_fwd_kernel"), (fwd, "span_bwd_preprocess_kernel"),
             (bwd, "span_bwd_kv_kernel"), (bwd, "span_bwd_q_kernel"))
    saved = {(mod, n): getattr(mod, n) for mod, n in names}
    drivers = triton.runtime.driver
    previous = drivers._active  # None until a driver is used; creating one needs a GPU
    drivers.set_active(_StandInDriver(arch))
    try:
        for mod, n in names:
            setattr(mod, n, _Compiling(n, saved[(mod, n)], compiled))
        # Shapes only matter through divisibility by 16 (and == 1): like the 7B rows, all sizes and
        # strides here are multiples of 16 except the unit head-dim stride.
        B, S, H_kv = 1, 256, 2
        H = H_kv * group
        q = torch.zeros(B, S, H, head_dim, dtype=dtype)
        k = torch.zeros(B, S, H_kv, head_dim, dtype=dtype)
        v = torch.zeros_like(k)
        lo = torch.zeros(B, S, dtype=torch.int32)
        hi = torch.full((B, S), S, dtype=torch.int32)
        blocks = ts.default_blocks(head_dim, dtype)
        scale = 1.0 / math.sqrt(head_dim)
        out, lse = ts._launch_forward(q, k, v, lo, hi, scale, blocks, None, arch)
        bounds = key_block_bounds(lo, hi, blocks.bwd_m, blocks.bwd_n, S)
        for deterministic in (False, True):
            ts._launch_backward(q, q, k, v, out, lse, lo, hi, bounds, scale, blocks, deterministic,
                                None, arch)
    finally:
        for (mod, n), jit in saved.items():
            setattr(mod, n, jit)
        drivers._active = previous
    rows = {}
    limits = ARCHS[arch]
    for name, kwargs, kernel in compiled:
        row_name = _row_name(name, kwargs)
        if row_name in rows:  # the preprocess kernel is the same in both backward passes
            continue
        regs, stores, loads = _ptxas_resources(kernel.asm["ptx"], arch)
        md = kernel.metadata
        warps, limiter = occupancy(regs, md.shared, md.num_warps, limits)
        rows[row_name] = dict(
            kernel=row_name, arch=arch, dtype=str(dtype).removeprefix("torch."), head_dim=head_dim,
            group=group, block_m=kwargs["BLOCK_M"], block_n=kwargs.get("BLOCK_N"),
            num_warps=md.num_warps, num_stages=md.num_stages, regs=regs, spill_stores=stores,
            spill_loads=loads, shared=md.shared, smem_limit=limits.smem_per_block,
            warps_per_sm=warps, occupancy_limiter=limiter,
        )
    return [rows[k] for k in KERNEL_ROWS if k in rows]


def collect(archs: list[int], dtypes: list[str], head_dims: list[int], groups: list[int],
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    for arch, dt, d, g in itertools.product(archs, dtypes, head_dims, groups):
        if progress:
            progress(f"sm_{arch} {dt} d{d} group {g}")
        rows += compile_config(arch, DTYPES[dt], d, g)
    return rows


_FIGURES = ("block_m", "block_n", "num_warps", "num_stages", "regs", "spill_stores", "spill_loads",
            "shared", "warps_per_sm", "occupancy_limiter")


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table; rows that do not depend on the GQA group (all but dK/dV) are merged across groups."""
    merged: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], r["head_dim"], tuple(r[f] for f in _FIGURES))
        if key in merged:
            merged[key]["groups"].append(r["group"])
        else:
            merged[key] = {**r, "groups": [r["group"]]}
    order = {k: i for i, k in enumerate(KERNEL_ROWS)}
    dorder = {k: i for i, k in enumerate(("bfloat16", "float16", "float32"))}
    out = ["| kernel | arch | dtype | head dim | GQA group | tile (m x n) | warps | stages | registers "
           "| spill stores / loads (B) | shared memory (B) | warps/SM (limiter) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(merged.values(), key=lambda r: (order[r["kernel"]], -r["arch"], dorder[r["dtype"]],
                                                     r["head_dim"], r["groups"])):
        tile = f"{r['block_m']}" + (f" x {r['block_n']}" if r["block_n"] else "")
        spill = f"{r['spill_stores']} / {r['spill_loads']}"
        if r["spill_stores"] or r["spill_loads"]:
            spill = f"**{spill}**"
        out.append(
            f"| {r['kernel']} | sm_{r['arch']} | {r['dtype'].replace('bfloat', 'bf').replace('float', 'fp')} "
            f"| {r['head_dim']} | {', '.join(map(str, r['groups']))} | {tile} | {r['num_warps']} "
            f"| {r['num_stages']} | {r['regs']} | {spill} | {r['shared']} "
            f"| {r['warps_per_sm']} ({r['occupancy_limiter']}) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(ARCHS, reverse=True), choices=sorted(ARCHS))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--group", type=int, nargs="+", default=list(GROUPS),
                    help="GQA group sizes (query heads per kv head)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    ap.add_argument("--progress", action="store_true", help="name each configuration on stderr")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
        ap.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.progress else None
    rows = collect(args.arch, args.dtype, args.head_dim, args.group, progress)
    print(json.dumps(rows) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
