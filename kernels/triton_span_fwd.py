"""Triton forward kernel of span attention (FlashAttention-2 style) and the backward preprocess.

Import only after TRITON_INTERPRET is decided: `@triton.jit` picks the interpreter at decoration
time. `kernels.triton_span` imports this module lazily for that reason.

Scores are kept in base 2: qk_scale = scale * log2(e), LSE is stored as log2(sum) + max in those
units ([B, H, S] fp32), +inf for rows with an empty span so that exp2(s - lse) is 0 there.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Slots (CNT_SLOT) of the optional tile-count buffer (int32 [8]): masked/full tiles of the forward
# pass 0/1, of the dK/dV pass 2/3, of the separate dQ pass 4/5.


@triton.jit
def _load_tile(ptrs, rmask, dmask, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking rows and/or padded head-dim columns only when needed."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    return x


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. "upcast" works around the Triton interpreter, whose dot
    multiplies bf16 operands as raw uint16: exact in fp32, like bf16 products on tensor cores."""
    if DOT_PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _q_block_bounds(lo, hi, valid, S, BLOCK_N: tl.constexpr):
    """Key-block loop bounds of one query block from its rows' spans lo/hi [BLOCK_M].

    Returns (start, full_lo, full_hi, end): [start, end) covers the union of the non-empty spans
    (spans are non-decreasing, so this is kv_lo of the first and kv_hi of the last non-empty row);
    [full_lo, full_hi) are the key blocks inside every row's span, which need no element mask.
    """
    nonempty = valid & (hi > lo)
    lo_min = tl.min(tl.where(nonempty, lo, S), 0)
    hi_max = tl.max(tl.where(nonempty, hi, 0), 0)
    lo_max = tl.max(tl.where(valid, lo, S), 0)
    hi_min = tl.min(tl.where(valid, hi, 0), 0)
    start = lo_min // BLOCK_N
    end = (hi_max + BLOCK_N - 1) // BLOCK_N
    f0 = tl.minimum(tl.maximum((lo_max + BLOCK_N - 1) // BLOCK_N, start), end)
    f1 = tl.maximum(tl.minimum(hi_min // BLOCK_N, end), f0)
    return start, f0, f1, end


@triton.jit
def _key_block_scores(
    q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kb, offs_d, dmask, S_K, qk_scale,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key block kb of a query block's loop (forward and separate dQ pass): its key positions
    offs_n [BLOCK_N], the K and V tiles [BLOCK_N, BLOCK_D] (rows past S_K masked only when MASKED),
    and the base-2 scores s = q @ k^T * qk_scale [BLOCK_M, BLOCK_N], not yet masked to the spans."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < S_K
    k = _load_tile(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                   nmask, dmask, MASKED, EVEN_D)
    v = _load_tile(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                   nmask, dmask, MASKED, EVEN_D)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    return offs_n, k, v, s


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    lo, hi, offs_d, dmask, kb_first, kb_last, S_K, qk_scale, CNT,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, COUNT: tl.constexpr,
    CNT_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over key blocks [kb_first, kb_last) of one query block."""
    for kb in range(kb_first, kb_last):
        offs_n, k, v, s = _key_block_scores(q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                                            stride_vd, kb, offs_d, dmask, S_K, qk_scale,
                                            BLOCK_N, EVEN_D, MASKED, DOT_PRECISION)
        if MASKED:
            span = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            s = tl.where(span, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new
        if COUNT:
            tl.atomic_add(CNT + CNT_SLOT, 1)
    return acc, m_i, l_i


@triton.jit
def span_fwd_kernel(
    Q, K, V, O, LSE, LO, HI, CNT,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    H, S, S_K, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, COUNT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one query block of one (batch, head). Grid (cdiv(S, BLOCK_M), B * H).
    S queries, S_K keys (S_K > S when the queries are the tail of a longer context)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_m < S
    dmask = offs_d < HEAD_DIM
    lo = tl.load(LO + b * S + offs_m, mask=valid, other=0)  # [BLOCK_M] int32
    hi = tl.load(HI + b * S + offs_m, mask=valid, other=0)
    start, f0, f1, end = _q_block_bounds(lo, hi, valid, S, BLOCK_N)

    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   valid, dmask, True, EVEN_D)  # [BLOCK_M, BLOCK_D]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Partial tiles before the fully-visible ones, the fully-visible ones, partial tiles after.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                               stride_vd, lo, hi, offs_d, dmask, start, f0, S_K, qk_scale, CNT,
                               BLOCK_N, EVEN_D, True, COUNT, 0, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                               stride_vd, lo, hi, offs_d, dmask, f0, f1, S_K, qk_scale, CNT,
                               BLOCK_N, EVEN_D, False, COUNT, 1, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                               stride_vd, lo, hi, offs_d, dmask, f1, end, S_K, qk_scale, CNT,
                               BLOCK_N, EVEN_D, True, COUNT, 0, DOT_PRECISION)
    seen = l_i > 0.0  # False exactly for rows with an empty span (and rows past S)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=valid[:, None] & dmask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=valid)


@triton.jit
def span_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32. Grid (cdiv(S, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_ds
                 + offs_d[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)
