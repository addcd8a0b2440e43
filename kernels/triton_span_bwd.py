"""Triton backward kernels of span attention: dK/dV per key block (optionally dQ by atomics), and a
deterministic dQ pass per query block.

Same conventions as triton_span_fwd.py (base-2 scores, LSE [B, H, S] fp32, +inf on empty rows).
The key-block kernel gets its query-block ranges from `spans.key_block_bounds` (computed on the
device before launch) since finding them needs a search over the spans.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_span_fwd import _dot, _key_block_scores, _load_tile, _q_block_bounds


@triton.jit
def _bwd_kv_inner(
    dk, dv, k, v, q_head0, do_head0, dq_head0, lse_head0, delta_head0, LO, HI,
    stride_qh, stride_doh, stride_dqh,
    stride_qs, stride_qd, stride_dos, stride_dod, stride_dqs, stride_dqd,
    offs_n, offs_d, dmask, qb_first, qb_last, S, qk_scale, sm_scale, CNT,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, COUNT: tl.constexpr, CNT_SLOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV [BLOCK_N, BLOCK_D] of one key block over query blocks [qb_first, qb_last)
    of each of the GROUP query heads sharing its kv head (head-major: all of head 0's blocks, then
    head 1's, ...). One flat loop over (head, query block) rather than a loop over heads around a
    loop over blocks: the nested loops spill registers in 16-bit (benchmarks/kernel_resources.py).
    The *_head0 pointers/offsets are those of the group's first query head."""
    n_qb = qb_last - qb_first
    for it in range(0, GROUP * n_qb):
        if GROUP == 1:
            qb = qb_first + it
            q_base = q_head0
            do_base = do_head0
            dq_base = dq_head0
            lse_base = lse_head0
            delta_base = delta_head0
        else:
            g = it // n_qb
            qb = qb_first + (it - g * n_qb)
            q_base = q_head0 + g * stride_qh
            do_base = do_head0 + g * stride_doh
            dq_base = dq_head0 + g * stride_dqh
            lse_base = lse_head0 + g * S
            delta_base = delta_head0 + g * S
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < S
        q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                       mmask, dmask, MASKED, EVEN_D)  # [BLOCK_M, BLOCK_D]
        do = _load_tile(do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                        mmask, dmask, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=mmask, other=float("inf"))  # [BLOCK_M]
            delta = tl.load(delta_base + offs_m, mask=mmask, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, tl.trans(q), DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            lo = tl.load(LO + offs_m, mask=mmask, other=0)
            hi = tl.load(HI + offs_m, mask=mmask, other=0)
            span_t = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            p_t = tl.where(span_t, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION)
        dp_t = _dot(v, tl.trans(do), DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(ds_t).to(k.dtype), k, DOT_PRECISION) * sm_scale
            dq_ptrs = dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
            tl.atomic_add(dq_ptrs, dq, mask=mmask[:, None] & dmask[None, :])
        if COUNT:
            tl.atomic_add(CNT + CNT_SLOT, 1)
    return dk, dv


@triton.jit
def span_bwd_kv_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, LO, HI, QB, CNT,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    H, H_KV, S, S_K, N_KB, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, ATOMIC_DQ: tl.constexpr, COUNT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one key block of one (batch, kv head), summing over its GQA group of query
    heads in registers (no atomics for dK/dV). Grid (cdiv(S_K, BLOCK_N), B * H_KV)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < S_K
    dmask = offs_d < HEAD_DIM
    bounds = QB + (b.to(tl.int64) * N_KB + pid_n) * 4
    start = tl.load(bounds)
    f0 = tl.load(bounds + 1)
    f1 = tl.load(bounds + 2)
    end = tl.load(bounds + 3)
    b64 = b.to(tl.int64)
    k = _load_tile(K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks
                   + offs_d[None, :] * stride_kd, nmask, dmask, True, EVEN_D)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs
                   + offs_d[None, :] * stride_vd, nmask, dmask, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo_base = LO + b64 * S
    hi_base = HI + b64 * S
    h0 = hk * GROUP  # the group's first query head
    q_head0 = Q + b64 * stride_qb + h0 * stride_qh
    do_head0 = DO + b64 * stride_dob + h0 * stride_doh
    dq_head0 = DQ + b64 * stride_dqb + h0 * stride_dqh
    lse_head0 = LSE + (b64 * H + h0) * S
    delta_head0 = DELTA + (b64 * H + h0) * S
    # Partial query blocks before the fully-visible ones, the fully-visible ones, partial after;
    # each pass over all GROUP heads (so dK/dV sum the partial-before tiles of every head first).
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, lse_head0, delta_head0,
                           lo_base, hi_base, stride_qh, stride_doh, stride_dqh, stride_qs, stride_qd,
                           stride_dos, stride_dod, stride_dqs, stride_dqd, offs_n, offs_d, dmask,
                           start, f0, S, qk_scale, sm_scale, CNT, GROUP, BLOCK_M, EVEN_D, True,
                           ATOMIC_DQ, COUNT, 2, DOT_PRECISION)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, lse_head0, delta_head0,
                           lo_base, hi_base, stride_qh, stride_doh, stride_dqh, stride_qs, stride_qd,
                           stride_dos, stride_dod, stride_dqs, stride_dqd, offs_n, offs_d, dmask,
                           f0, f1, S, qk_scale, sm_scale, CNT, GROUP, BLOCK_M, EVEN_D, False,
                           ATOMIC_DQ, COUNT, 3, DOT_PRECISION)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, lse_head0, delta_head0,
                           lo_base, hi_base, stride_qh, stride_doh, stride_dqh, stride_qs, stride_qd,
                           stride_dos, stride_dod, stride_dqs, stride_dqd, offs_n, offs_d, dmask,
                           f1, end, S, qk_scale, sm_scale, CNT, GROUP, BLOCK_M, EVEN_D, True,
                           ATOMIC_DQ, COUNT, 2, DOT_PRECISION)
    out_mask = nmask[:, None] & dmask[None, :]
    tl.store(DK + b64 * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b64 * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_q_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    lo, hi, offs_d, dmask, kb_first, kb_last, S_K, qk_scale, CNT,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, COUNT: tl.constexpr,
    CNT_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ [BLOCK_M, BLOCK_D] (unscaled) of one query block over key blocks."""
    for kb in range(kb_first, kb_last):
        offs_n, k, v, s = _key_block_scores(q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                                            stride_vd, kb, offs_d, dmask, S_K, qk_scale,
                                            BLOCK_N, EVEN_D, MASKED, DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            span = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            p = tl.where(span, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)
        if COUNT:
            tl.atomic_add(CNT + CNT_SLOT, 1)
    return dq


@triton.jit
def span_bwd_q_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, LO, HI, CNT,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    H, S, S_K, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, COUNT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Deterministic dQ: one program = one query block of one (batch, head), looping over the same
    key blocks as the forward. Grid (cdiv(S, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_m < S
    dmask = offs_d < HEAD_DIM
    lo = tl.load(LO + b64 * S + offs_m, mask=valid, other=0)
    hi = tl.load(HI + b64 * S + offs_m, mask=valid, other=0)
    start, f0, f1, end = _q_block_bounds(lo, hi, valid, S, BLOCK_N)
    q = _load_tile(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                   + offs_d[None, :] * stride_qd, valid, dmask, True, EVEN_D)
    do = _load_tile(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :] * stride_dod, valid, dmask, True, EVEN_D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * S + offs_m, mask=valid, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + offs_m, mask=valid, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                      stride_vd, lo, hi, offs_d, dmask, start, f0, S_K, qk_scale, CNT,
                      BLOCK_N, EVEN_D, True, COUNT, 4, DOT_PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                      stride_vd, lo, hi, offs_d, dmask, f0, f1, S_K, qk_scale, CNT,
                      BLOCK_N, EVEN_D, False, COUNT, 5, DOT_PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                      stride_vd, lo, hi, offs_d, dmask, f1, end, S_K, qk_scale, CNT,
                      BLOCK_N, EVEN_D, True, COUNT, 4, DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=valid[:, None] & dmask[None, :])
