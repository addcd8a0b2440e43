"""FlexAttention backend: forward vs the SDPA reference on CPU, BlockMask construction and caching.

Tolerances: fp32 atol 1e-5, rtol 1e-5; bf16 inputs vs an fp32 reference on the same rounded inputs:
max abs error <= 2e-2 x max |reference|. CPU flex has no backward, so only the forward is tested.
Tensors live on TEST_DEVICE (tests/conftest.py: the GPU with TRANSFUSION_TEST_DEVICE=cuda).
"""

import random
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from kernels import flex
from kernels.reference import sdpa_span_attention
from kernels.spans import spans_from_documents
from tests.conftest import TEST_DEVICE


def packing(S: int, seed: int, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans [len(kinds), S]: rows of short docs with images, an image-first document, an image
    filling the row, text-only documents, or only padding."""
    rng = random.Random(seed)
    rows = []
    for kind in kinds:
        docs = []
        if kind == "image_fills_row":
            docs = [(S, [(0, S)])]
        elif kind == "image_first":
            docs = [(S // 2, [(0, S // 2 - 5)]), (S // 3, [])]
        elif kind in ("short_docs", "text_only"):
            used, end = 0, S - rng.randint(0, S // 6)
            while used < end:
                length = min(end - used, rng.randint(3, 40 if kind == "short_docs" else S // 2))
                img = length // 2
                images = [(rng.randint(0, length - img), img)] if kind == "short_docs" and rng.random() < 0.5 else []
                docs.append((length, images))
                used += length
        rows.append(spans_from_documents(docs, S))
    return torch.stack([r[0] for r in rows]).to(TEST_DEVICE), torch.stack([r[1] for r in rows]).to(TEST_DEVICE)


def qkv(B, S, H, H_kv, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, h, D, generator=gen).to(TEST_DEVICE) for h in (H, H_kv, H_kv))


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    """Eager flex warns that it is unfused; the tests use it on purpose (no compile time)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.mark.parametrize(
    "S,kinds,H,H_kv,D",
    [
        (300, ["short_docs", "image_first", "all_padding"], 4, 2, 32),  # ragged S, GQA
        (256, ["image_fills_row", "text_only"], 2, 2, 64),
        (200, ["short_docs"], 2, 1, 128),
    ],
)
def test_forward_matches_reference_fp32(S, kinds, H, H_kv, D):
    lo, hi = packing(S, seed=S, kinds=kinds)
    q, k, v = qkv(len(kinds), S, H, H_kv, D)
    out = flex.flex_span_attention(q, k, v, lo, hi, compile=False)
    torch.testing.assert_close(out, sdpa_span_attention(q, k, v, lo, hi), atol=1e-5, rtol=1e-5)
    empty = hi <= lo
    assert (out[empty] == 0).all()


def test_queries_are_the_tail_of_a_longer_context():
    S_k, S = 300, 140
    lo, hi = spans_from_documents([(100, []), (150, [(20, 60)]), (50, [(0, 30)])], S_k)
    lo, hi = lo[None, S_k - S :].to(TEST_DEVICE), hi[None, S_k - S :].to(TEST_DEVICE)
    q, _, _ = qkv(1, S, 2, 1, 32, seed=5)
    _, k, v = qkv(1, S_k, 2, 1, 32, seed=6)
    out = flex.flex_span_attention(q, k, v, lo, hi, compile=False)
    torch.testing.assert_close(out, sdpa_span_attention(q, k, v, lo, hi), atol=1e-5, rtol=1e-5)


def test_forward_bf16():
    S = 200
    lo, hi = packing(S, seed=1, kinds=["short_docs", "image_first"])
    q, k, v = (x.bfloat16() for x in qkv(2, S, 2, 1, 64, seed=1))
    out = flex.flex_span_attention(q, k, v, lo, hi, compile=False)
    ref = sdpa_span_attention(q.float(), k.float(), v.float(), lo, hi)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


# (batch, length) pairs that change both at every call; shared with test_kernels_dispatch.
SHAPE_CHANGES = [(2, 160), (3, 200), (1, 300)]


def test_compiled_forward_survives_shape_changes():
    """The default path (torch.compile'd flex) on CPU: three (batch, length) shapes in a row, each
    vs the reference; ~10 s of compilation per shape on a cold inductor cache.

    From a fresh dynamo state: with torch's default dynamic-shape recompile the second shape made
    inductor write C++ that does not compile (torch 2.14.1)."""
    torch._dynamo.reset()
    flex._compiled.clear()
    for B, S in SHAPE_CHANGES:
        lo, hi = packing(S, seed=S, kinds=(["short_docs", "image_first", "text_only"] * B)[:B])
        q, k, v = qkv(B, S, 2, 1, 16, seed=S)
        out = flex.flex_span_attention(q, k, v, lo, hi, compile=True)
        assert out.shape == (B, S, 2, 16)
        torch.testing.assert_close(out, sdpa_span_attention(q, k, v, lo, hi), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S", [256, 333])
def test_block_mask_matches_create_block_mask(S):
    lo, hi = packing(S, seed=3, kinds=["short_docs", "image_first", "image_fills_row", "text_only"])
    ours = flex.build_span_block_mask(lo, hi)
    ref = create_block_mask(flex.span_mask_mod(lo, hi), lo.shape[0], None, S, S, device=TEST_DEVICE)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    if S % flex.FLEX_BLOCK == 0:  # ragged tails may be classified differently; both are correct
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


def test_block_mask_is_cached_per_span_tensors():
    flex._block_masks.clear()
    lo, hi = packing(128, seed=4, kinds=["short_docs"])
    first = flex.span_block_mask(lo, hi)
    assert flex.span_block_mask(lo, hi) is first  # every layer of one batch reuses it
    same_values = flex.span_block_mask(lo.clone(), hi.clone())
    assert same_values is not first  # a new batch (new tensors) gets its own
    hi[0, 5] += 0  # in-place write bumps the version: rebuilt
    assert flex.span_block_mask(lo, hi) is not first


def test_probe_refuses_cpu_backward():
    q = torch.randn(1, 8, 2, 16)
    assert flex.flex_unavailable(q) is None
    reason = flex.flex_unavailable(q.requires_grad_())
    assert reason is not None and "backward" in reason and "CPU" in reason
    with torch.no_grad():
        assert flex.flex_unavailable(q) is None
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex.flex_span_attention(q, q.detach(), q.detach(), torch.zeros(1, 8, dtype=torch.int32),
                                 torch.ones(1, 8, dtype=torch.int32))
