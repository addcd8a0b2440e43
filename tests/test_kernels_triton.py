"""Triton span-attention kernels vs the SDPA reference, under TRITON_INTERPRET=1 on CPU (compiled on
the GPU with TRANSFUSION_TEST_DEVICE=cuda, tests/conftest.py; there the cases also run in bf16).

Tolerances: fp32 vs the fp32 reference atol 2e-5, rtol 1e-5 (observed ~2e-6); fp16 / bf16 inputs
vs an fp32 reference on the same rounded inputs: max abs error <= 2e-3 (fp16) / 2e-2 (bf16) times
the largest |value| of each reference tensor. Sizes stay small: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels.reference import sdpa_span_attention  # noqa: E402
from kernels.spans import (  # noqa: E402
    cdiv, key_block_bounds, mask_tile_counts, query_block_bounds, spans_from_documents,
)
from kernels.triton_span import BlockSizes, triton_span_attention, triton_tile_counts  # noqa: E402
from tests.conftest import TEST_DEVICE  # noqa: E402

Docs = list[tuple[int, list[tuple[int, int]]]]


# ----------------------------------------------------------------------------- packings
def random_docs(rng: random.Random, S: int, kind: str) -> Docs:
    """Documents for one row of length S; `kind` picks the situation the row exercises."""
    if kind == "image_fills_row":
        return [(S, [(0, S)])]
    if kind == "all_padding":
        return []
    docs: Docs = []
    used = 0
    pad = rng.randint(0, S // 8) if kind not in ("image_end", "image_start") else 0
    budget = S - pad
    if kind == "image_start":  # an image-first document at position 0
        n = rng.randint(S // 4, S // 2)
        cap = rng.randint(1, 12)
        docs.append((n + cap, [(0, n)]))
        used = n + cap
    tail: Docs = []
    if kind == "image_end":  # a caption-first document whose image ends the row
        n = rng.randint(S // 4, S // 2)
        cap = rng.randint(1, 12)
        tail = [(cap + n, [(cap, n)])]
        budget -= cap + n
    while used < budget:
        room = budget - used
        if kind == "many_short":
            length = min(room, rng.randint(1, 12))
            img = rng.randint(2, 6)
            images = [(rng.randint(0, length - img), img)] if length > img and rng.random() < 0.4 else []
        elif kind == "image_middle":
            length = min(room, rng.randint(S // 4, S // 2))
            img = length // 2
            images = [(rng.randint(1, length - img - 1), img)] if length > img + 2 else []
        else:  # text_only
            length = min(room, rng.randint(5, S // 2))
            images = []
        docs.append((length, images))
        used += length
    return docs + tail


def make_spans(S: int, kinds: list[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_lo, kv_hi [len(kinds), S] int32 on TEST_DEVICE, one row per kind."""
    rng = random.Random(seed)
    rows = [spans_from_documents(random_docs(rng, S, kind), S) for kind in kinds]
    return torch.stack([r[0] for r in rows]).to(TEST_DEVICE), torch.stack([r[1] for r in rows]).to(TEST_DEVICE)


def make_qkv(B: int, S: int, H: int, H_kv: int, D: int, seed: int = 0, strided: bool = False):
    """q [B, S, H, D], k/v [B, S, H_kv, D] fp32 on TEST_DEVICE (drawn on the CPU, so the values do not
    depend on the device); strided=True slices them out of one fused tensor."""
    gen = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(B, S, H + 2 * H_kv, D, generator=gen).to(TEST_DEVICE)
        return qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :]
    return tuple(torch.randn(B, S, h, D, generator=gen).to(TEST_DEVICE) for h in (H, H_kv, H_kv))


def run_both(q, k, v, lo, hi, dtype=torch.float32, blocks=None, deterministic=False, seed=1):
    """(out, dq, dk, dv) of the Triton kernel on `dtype` inputs and of the fp32 reference on the
    same (rounded) inputs, for a random upstream gradient."""
    low = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
    ref = [x.to(dtype).float().detach().requires_grad_() for x in (q, k, v)]
    out = triton_span_attention(*low, lo, hi, blocks=blocks, deterministic=deterministic)
    out_ref = sdpa_span_attention(*ref, lo, hi)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed)).to(out_ref.device)
    got = (out, *torch.autograd.grad(out, low, grad.to(dtype)))
    want = (out_ref, *torch.autograd.grad(out_ref, ref, grad))
    return got, want


def assert_close_fp32(got, want):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- fp32 accuracy
FP32_CASES = {
    # name: (S, kinds, H, H_kv, D, blocks, strided)
    "short_docs_gqa_ragged": (200, ["many_short", "image_start", "image_end"], 4, 2, 32,
                              BlockSizes(32, 16, 16, 32), True),
    "full_image_text_padding": (96, ["image_fills_row", "text_only", "all_padding"], 2, 2, 64,
                                BlockSizes(32, 32, 32, 32), False),
    "d128_default_blocks": (80, ["image_middle"], 2, 1, 128, None, False),
    "d16_tiny_blocks": (130, ["many_short", "image_middle"], 2, 1, 16, BlockSizes(16, 16, 16, 16), False),
    "d24_not_pow2": (64, ["image_middle"], 2, 2, 24, BlockSizes(16, 16, 16, 16), False),
}


@pytest.mark.parametrize("case", sorted(FP32_CASES))
def test_fp32_forward_and_grads_match_reference(case):
    S, kinds, H, H_kv, D, blocks, strided = FP32_CASES[case]
    lo, hi = make_spans(S, kinds, seed=len(case))
    q, k, v = make_qkv(len(kinds), S, H, H_kv, D, strided=strided)
    got, want = run_both(q, k, v, lo, hi, blocks=blocks)
    assert_close_fp32(got, want)
    empty = hi <= lo  # padding: zero output and zero gradient
    assert empty.any() or case in ("d128_default_blocks", "d24_not_pow2")
    assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


def test_queries_are_the_tail_of_a_longer_context():
    """S_k > S: queries are the last S positions of the context (chunked prefill), spans index keys."""
    S_k, S = 120, 50
    lo, hi = spans_from_documents([(30, []), (60, [(10, 25)]), (30, [(0, 20)])], S_k)
    lo, hi = lo[None, S_k - S :].to(TEST_DEVICE), hi[None, S_k - S :].to(TEST_DEVICE)  # [1, S]
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, S, 2, 32, generator=gen).to(TEST_DEVICE)
    k, v = (torch.randn(1, S_k, 1, 32, generator=gen).to(TEST_DEVICE),
            torch.randn(1, S_k, 1, 32, generator=gen).to(TEST_DEVICE))
    got, want = run_both(q, k, v, lo, hi, blocks=BlockSizes(16, 16, 16, 16))
    assert_close_fp32(got, want)


# ----------------------------------------------------------------------------- fp16 / bf16
# Max abs error relative to max |reference| of the same tensor (out, dq, dk, dv). Observed: fp16
# <= 5.3e-4, bf16 <= 9.3e-3 (CPU SDPA in the same dtype: 8e-4 / 6.4e-3); P and dS are rounded to
# the input dtype before their matmuls, like FlashAttention-2.
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close_low_precision(got, want, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        err = (a.float() - b).abs().max().item()
        assert err <= LOW_PRECISION_TOL[dtype] * b.abs().max().item(), f"{name}: max error {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_matches_fp32_reference(dtype):
    S = 128
    lo, hi = make_spans(S, ["image_middle", "many_short"], seed=3)
    q, k, v = make_qkv(2, S, 2, 1, 64, seed=4)
    got, want = run_both(q, k, v, lo, hi, dtype=dtype, blocks=BlockSizes(32, 32, 32, 32))
    assert_close_low_precision(got, want, dtype)


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="compiled bf16 kernels: TRANSFUSION_TEST_DEVICE=cuda on a GPU")
@pytest.mark.parametrize("case", sorted(FP32_CASES))
def test_fp32_cases_in_bf16_compiled(case):
    """The fp32 cases' packings and shapes in bf16 (the training dtype) through the compiled kernels."""
    S, kinds, H, H_kv, D, blocks, strided = FP32_CASES[case]
    lo, hi = make_spans(S, kinds, seed=len(case))
    q, k, v = make_qkv(len(kinds), S, H, H_kv, D, strided=strided)
    got, want = run_both(q, k, v, lo, hi, dtype=torch.bfloat16, blocks=blocks)
    assert_close_low_precision(got, want, torch.bfloat16)
    empty = hi <= lo
    assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


# ----------------------------------------------------------------------------- determinism
def test_deterministic_backward_is_bitwise_reproducible():
    S = 112
    lo, hi = make_spans(S, ["image_start"], seed=5)
    q, k, v = make_qkv(1, S, 4, 2, 32, seed=6)
    blocks = BlockSizes(32, 16, 16, 16)
    runs = [run_both(q, k, v, lo, hi, blocks=blocks, deterministic=True)[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    got_atomic, want = run_both(q, k, v, lo, hi, blocks=blocks, deterministic=False)
    assert_close_fp32(runs[0], want)
    assert_close_fp32(got_atomic, want)


# ----------------------------------------------------------------------------- block skipping
def test_kernel_computes_exactly_the_tiles_that_intersect_the_mask():
    S = 256
    lo, hi = make_spans(S, ["image_middle", "text_only", "image_fills_row", "many_short"], seed=7)
    blocks = BlockSizes(32, 16, 16, 32)
    counts = triton_tile_counts(lo, hi, blocks, deterministic=True)
    hit_f, partial_f = mask_tile_counts(lo, hi, blocks.fwd_m, blocks.fwd_n)
    hit_b, partial_b = mask_tile_counts(lo, hi, blocks.bwd_m, blocks.bwd_n)
    assert counts["forward"] == (partial_f, hit_f - partial_f)
    assert counts["backward_dkdv"] == (partial_b, hit_b - partial_b)
    assert counts["backward_dq"] == (partial_b, hit_b - partial_b)
    # The packing is sparse enough that skipping matters, and most computed tiles skip the mask.
    dense = lo.shape[0] * cdiv(S, blocks.fwd_m) * cdiv(S, blocks.fwd_n)
    assert hit_f < 0.6 * dense and partial_f < hit_f - partial_f
    atomic = triton_tile_counts(lo, hi, blocks, deterministic=False)
    assert atomic["backward_dkdv"] == counts["backward_dkdv"] and atomic["backward_dq"] == (0, 0)


# ----------------------------------------------------------------------------- host-side bounds
@st.composite
def packings(draw):
    S = draw(st.integers(1, 160))
    docs: Docs = []
    used = 0
    end = S - draw(st.integers(0, S // 3))
    while used < end:
        length = draw(st.integers(1, end - used))
        images = []
        if length >= 2 and draw(st.booleans()):
            n = draw(st.integers(1, length))
            images = [(draw(st.integers(0, length - n)), n)]
        docs.append((length, images))
        used += length
    lo, hi = spans_from_documents(docs, S)
    bm = draw(st.sampled_from([16, 32]))
    bn = draw(st.sampled_from([16, 32]))
    return lo[None], hi[None], bm, bn


@settings(max_examples=150, deadline=None)
@given(packings())
def test_block_bounds_cover_exactly_the_mask_tiles(packing):
    lo, hi, bm, bn = packing
    hit, partial = mask_tile_counts(lo, hi, bm, bn)
    for bounds in (query_block_bounds(lo, hi, bm, bn), key_block_bounds(lo, hi, bm, bn).long()):
        start, f0, f1, end = bounds.unbind(-1)
        assert bool(((f0 <= f1) & (f1 <= end) & ((start <= f0) | (start >= end))).all())
        n_tiles = int((end - start).clamp(min=0).sum())
        n_full = int((f1 - f0).sum())
        assert (n_tiles, n_tiles - n_full) == (hit, partial)


# Compilation for sm_80 / sm_90 (which the interpreter skips): tests/test_kernels_compile.py.
