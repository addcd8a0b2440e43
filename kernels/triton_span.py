"""Triton span-attention backend: launches, autograd wrapper, availability probe, tile counting.

Triton itself is imported lazily (first call), because `@triton.jit` decides at import time
whether the kernels run compiled (CUDA) or under the interpreter (TRITON_INTERPRET=1, CPU).

Which path is for what:

- **16-bit (bf16 / fp16): the training path.** Tile shapes (`default_blocks`) and num_warps /
  num_stages (`launch_options`, per GPU architecture: the sm_80 and sm_90 families) are chosen so
  that every kernel (forward, backward preprocess, dK/dV with and without atomic dQ, deterministic
  dQ) compiles for sm_80 and sm_90 at head dims 64 and 128 and GQA groups 1/4/8 without register
  spills and within the per-block shared memory limit; tests/test_kernels_compile.py checks this
  ahead of time on CPU, `python -m benchmarks.kernel_resources` prints the compiler's figures.
- **fp32: numerics and reference only** (tests under the interpreter, checking the 16-bit path). It
  compiles for both architectures but spills registers (exact fp32 dots, no tensor-core tiles);
  not tuned and not meant for training speed.

On the CPU (interpreter) `arch` is None: the sm_90 choices apply (the interpreter ignores
num_warps / num_stages, so only the tile shapes matter there).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from .spans import SpanCache, cdiv, key_block_bounds

_INTERPRET_VALUES = ("1", "true", "on", "yes")
_bounds_cache = SpanCache()


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _INTERPRET_VALUES


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(q: torch.Tensor) -> str | None:
    """None when the Triton kernels can run for tensors like `q`, else the reason.

    Never imports triton: on CPU, triton must be first imported with TRITON_INTERPRET=1 already set
    (its own tl.* functions, not just our kernels, are built for the interpreter at import time).
    """
    if not _triton_installed():
        return "the 'triton' package is not installed"
    if q.device.type == "cuda":
        return None
    if q.device.type != "cpu":
        return f"needs a CUDA GPU or TRITON_INTERPRET=1 (tensors are on {q.device.type})"
    if not interpreter_requested():
        return "needs a CUDA GPU or TRITON_INTERPRET=1 (set before triton is first imported)"
    tl = sys.modules.get("triton.language")
    if tl is not None and type(tl.standard.min).__name__ != "InterpretedFunction":
        return "needs TRITON_INTERPRET=1 set before triton is first imported (it was imported without it)"
    return None


def _kernels() -> tuple[ModuleType, ModuleType]:
    from . import triton_span_bwd, triton_span_fwd

    return triton_span_fwd, triton_span_bwd


@dataclass(frozen=True)
class BlockSizes:
    """Tile shapes: forward (fwd_m queries x fwd_n keys) and backward (bwd_m x bwd_n)."""

    fwd_m: int = 128
    fwd_n: int = 64
    bwd_m: int = 64
    bwd_n: int = 64


def default_blocks(head_dim: int, dtype: torch.dtype) -> BlockSizes:
    """Tile shapes for this head dim and dtype: the same on sm_80 and sm_90 (what differs per
    architecture is num_warps / num_stages, `launch_options`), so planner/runtime.py's tile counts
    hold on both."""
    wide = head_dim > 64
    if dtype == torch.float32:
        return BlockSizes(64, 32, 32, 32) if wide else BlockSizes(64, 64, 32, 64)
    return BlockSizes(128, 32, 32, 64) if wide else BlockSizes(128, 64, 64, 64)


KERNELS = ("forward", "preprocess", "dkdv", "dq")


def launch_options(kernel: str, head_dim: int, dtype: torch.dtype, arch: int | None) -> dict[str, int]:
    """num_warps / num_stages of one kernel ("forward", "preprocess", "dkdv", "dq") with the
    default_blocks tiles, for compute capability `arch` (80 for A100, 90 for H100; None: the
    interpreter, which uses the sm_90 choice).

    16-bit: head dim > 64 uses 8 warps and 3 stages on both architectures. Head dim 64 uses 4 warps
    on sm_90 (wgmma) but 8 on the sm_80 family (mma.sync keeps more of each tile in registers: at
    4 warps the forward, dK/dV and dQ kernels spill there), and the sm_80 dK/dV kernel 2 stages
    (3 spill). fp32 (may spill, see the module docstring): 4 warps at head dim 64, 8 warps and 2
    stages above (to stay near 100 KB of shared memory)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown span-attention kernel {kernel!r}, expected one of {KERNELS}")
    if kernel == "preprocess":
        return {"num_warps": 4, "num_stages": 3}
    wide = head_dim > 64
    if dtype == torch.float32:
        return {"num_warps": 8, "num_stages": 2} if wide else {"num_warps": 4, "num_stages": 3}
    if wide:
        return {"num_warps": 8, "num_stages": 3}
    if arch is not None and arch < 90:
        return {"num_warps": 8, "num_stages": 2 if kernel == "dkdv" else 3}
    return {"num_warps": 4, "num_stages": 3}


def cuda_arch(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as major * 10 + minor (80: A100, 90: H100), the
    target Triton compiles for there; None for a CPU device (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _dot_precision(dtype: torch.dtype, arch: int | None) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs unless TF32 matmuls are allowed;
    "upcast" for bf16 under the interpreter (its bf16 dot is wrong, see triton_span_fwd._dot)."""
    if dtype == torch.bfloat16 and arch is None:
        return "upcast"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> None:
    B, S, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] < S or k.shape[3] != D:
        raise ValueError(f"span attention: q {tuple(q.shape)} does not match k {tuple(k.shape)} / v {tuple(v.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"span attention: {H} query heads not divisible by {k.shape[2]} kv heads")
    if kv_lo.shape != (B, S) or kv_hi.shape != (B, S):
        raise ValueError(f"span attention: spans must be [B, S] = {(B, S)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"span attention (triton): q/k/v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"span attention (triton): head dim {D} > 256 is not supported")


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    scale: float, blocks: BlockSizes, counter: torch.Tensor | None, arch: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: returns out [B, S, H, D] (q's dtype) and LSE [B, H, S] fp32 (base 2).
    `arch`: cuda_arch of q's device (benchmarks/kernel_resources.py passes a target's)."""
    fwd, _ = _kernels()
    B, S, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    cnt = counter if counter is not None else lse  # unused placeholder when not counting
    grid = (cdiv(S, blocks.fwd_m), B * H)
    fwd.span_fwd_kernel[grid](
        q, k, v, out, lse, lo, hi, cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, S, k.shape[1], scale * math.log2(math.e),
        GROUP=H // k.shape[2], HEAD_DIM=D, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n,
        BLOCK_D=max(16, triton_next_pow2(D)), COUNT=counter is not None,
        DOT_PRECISION=_dot_precision(q.dtype, arch), **launch_options("forward", D, q.dtype, arch),
    )
    return out, lse


def _launch_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qb_bounds: torch.Tensor, scale: float,
    blocks: BlockSizes, deterministic: bool, counter: torch.Tensor | None, arch: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run preprocess, dK/dV and dQ kernels; returns (dq, dk, dv) in the inputs' dtypes."""
    fwd, bwd = _kernels()
    B, S, H, D = q.shape
    H_kv = k.shape[2]
    block_d = max(16, triton_next_pow2(D))
    delta = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    fwd.span_bwd_preprocess_kernel[(cdiv(S, 64), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, S, HEAD_DIM=D, BLOCK_M=64, BLOCK_D=block_d,
        **launch_options("preprocess", D, q.dtype, arch),
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # Atomic dQ accumulates in an fp32 buffer; the deterministic pass writes dq directly.
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    cnt = counter if counter is not None else delta
    qk_scale = scale * math.log2(math.e)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, COUNT=counter is not None,
                  DOT_PRECISION=_dot_precision(q.dtype, arch))
    S_k = k.shape[1]
    bwd.span_bwd_kv_kernel[(cdiv(S_k, blocks.bwd_n), B * H_kv)](
        q, k, v, do, dq, dk, dv, lse, delta, lo, hi, qb_bounds, cnt,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        H, H_kv, S, S_k, cdiv(S_k, blocks.bwd_n), qk_scale, scale,
        GROUP=H // H_kv, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, ATOMIC_DQ=not deterministic,
        **common, **launch_options("dkdv", D, q.dtype, arch),
    )
    if deterministic:
        bwd.span_bwd_q_kernel[(cdiv(S, blocks.bwd_m), B * H)](
            q, k, v, do, dq, lse, delta, lo, hi, cnt,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, S, S_k, qk_scale, scale,
            GROUP=H // H_kv, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, **common,
            **launch_options("dq", D, q.dtype, arch),
        )
    else:
        dq = dq.to(q.dtype)
    return dq, dk, dv


class SpanAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, LSE); backward recomputes the probabilities."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
        scale: float, blocks: BlockSizes, deterministic: bool, counter: torch.Tensor | None,
        qb_bounds: torch.Tensor | None,
    ) -> torch.Tensor:
        arch = cuda_arch(q.device)
        out, lse = _launch_forward(q, k, v, lo, hi, scale, blocks, counter, arch)
        ctx.save_for_backward(q, k, v, out, lse, lo, hi, qb_bounds if qb_bounds is not None else lse)
        ctx.has_bounds = qb_bounds is not None
        ctx.scale, ctx.blocks, ctx.deterministic, ctx.counter = scale, blocks, deterministic, counter
        ctx.arch = arch
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse, lo, hi, qb_bounds = ctx.saved_tensors
        if not ctx.has_bounds:
            qb_bounds = key_block_bounds(lo, hi, ctx.blocks.bwd_m, ctx.blocks.bwd_n, k.shape[1])
        do = _last_dim_contiguous(do)
        dq, dk, dv = _launch_backward(do, q, k, v, out, lse, lo, hi, qb_bounds, ctx.scale,
                                      ctx.blocks, ctx.deterministic, ctx.counter, ctx.arch)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    scale: float | None = None, deterministic: bool | None = None, blocks: BlockSizes | None = None,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Span attention with the Triton kernels: q [B, S, H, D], k/v [B, S_k, H_kv, D] -> [B, S, H, D].

    S_k >= S (S_k > S: the queries are the last S positions of a longer context, spans index keys).

    deterministic=None follows torch.are_deterministic_algorithms_enabled(); True computes dQ in a
    separate pass over key blocks instead of atomics (bitwise reproducible). `counter` (int32 [8],
    zeros) makes the kernels count the tiles they compute (slots: see the top of triton_span_fwd).
    """
    _check(q, k, v, kv_lo, kv_hi)
    reason = triton_unavailable(q)
    if reason is not None:
        raise RuntimeError(f"triton span attention cannot run here: {reason}")
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    deterministic = torch.are_deterministic_algorithms_enabled() if deterministic is None else deterministic
    blocks = default_blocks(D, q.dtype) if blocks is None else blocks
    if any(x < 16 or x & (x - 1) for x in (blocks.fwd_m, blocks.fwd_n, blocks.bwd_m, blocks.bwd_n)):
        raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot), got {blocks}")
    lo = kv_lo.to(device=q.device, dtype=torch.int32).contiguous()
    hi = kv_hi.to(device=q.device, dtype=torch.int32).contiguous()
    qb_bounds = None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        # Shared by all layers of one batch: computed once per (kv_lo, kv_hi) tensor pair.
        qb_bounds = _bounds_cache.get(
            kv_lo, kv_hi, (blocks.bwd_m, blocks.bwd_n, k.shape[1], q.device),
            lambda: key_block_bounds(lo, hi, blocks.bwd_m, blocks.bwd_n, k.shape[1]),
        )
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return SpanAttentionFunction.apply(q, k, v, lo, hi, scale, blocks, deterministic, counter, qb_bounds)


def triton_tile_counts(
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, blocks: BlockSizes, deterministic: bool = True,
    head_dim: int = 16,
) -> dict[str, tuple[int, int]]:
    """Tiles the kernels themselves compute for these spans, summed over the batch, one head.

    Runs forward and backward on random data with the in-kernel counter enabled. Returns
    {"forward": (masked, full), "backward_dkdv": (...), "backward_dq": (...)}; backward_dq is the
    separate dQ pass (deterministic=True) or (0, 0) with atomic dQ.
    """
    B, S = kv_lo.shape
    dev = kv_lo.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, S, 1, head_dim, generator=gen).to(dev).requires_grad_() for _ in range(3))
    counter = torch.zeros(8, dtype=torch.int32, device=dev)
    out = triton_span_attention(q, k, v, kv_lo, kv_hi, deterministic=deterministic, blocks=blocks, counter=counter)
    fwd = counter.tolist()
    out.sum().backward()
    c = counter.tolist()
    return {
        "forward": (fwd[0], fwd[1]),
        "backward_dkdv": (c[2], c[3]),
        "backward_dq": (c[4], c[5]),
    }
