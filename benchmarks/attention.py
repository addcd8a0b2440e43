"""Attention work on realistic packed Transfusion rows, and CPU time of the reference vs flex.

Prints, for 4096-token rows packed with the paper's mix (text-only documents of lognormal length;
caption+image documents with BOI + 256 patches + EOI, caption first 80% / image first 20%; trailing
padding): the fraction of (query block, key block) tiles the span kernel's loop bounds compute
versus a dense kernel and a causal-only kernel, the FLOPs that saves at the 7B shape, and the
forward time of the SDPA dense-mask reference vs FlexAttention on this CPU, side by side.
Needs no GPU. Run: python -m benchmarks.attention [--rows 32] [--no-compile]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

from kernels.flex import build_span_block_mask, flex_span_attention, span_mask_mod  # noqa: E402
from kernels.reference import sdpa_span_attention  # noqa: E402
from kernels.spans import (  # noqa: E402
    causal_tile_count, cdiv, key_block_bounds, mask_tile_counts, query_block_bounds, spans_from_documents,
)

PATCHES = 256  # 256x256 image, 8x VAE, 2x2 patches
IMAGE_TOKENS = PATCHES + 2  # BOI + patches + EOI


def sample_document(
    rng: random.Random, image_frac: float, text_median: int
) -> tuple[int, list[tuple[int, int]]]:
    """One document: (length, [(patch offset, n patches)]), with BOS/EOS counted in the text."""
    if rng.random() >= image_frac:  # text-only: lognormal around text_median tokens
        return max(8, min(4096, int(rng.lognormvariate(math.log(text_median), 0.9)))), []
    caption = rng.randint(20, 80) + 2  # caption + BOS/EOS
    if rng.random() < 0.8:  # caption first: [caption] BOI p... EOI
        return caption + IMAGE_TOKENS, [(caption + 1, PATCHES)]
    return IMAGE_TOKENS + caption, [(1, PATCHES)]  # image first: BOI p... EOI [caption]


def pack_row(
    rng: random.Random, seq_len: int, image_frac: float, text_median: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents back to back until the next one does not fit; the rest is padding."""
    docs, used = [], 0
    while True:
        doc = sample_document(rng, image_frac, text_median)
        if used + doc[0] > seq_len:
            break
        docs.append(doc)
        used += doc[0]
    return spans_from_documents(docs, seq_len)


def tile_report(lo: torch.Tensor, hi: torch.Tensor, bm: int, bn: int, label: str) -> dict[str, float]:
    """Tiles of the span kernel's loop bounds (forward and backward) vs dense and causal-only."""
    B, S = lo.shape
    fwd = query_block_bounds(lo, hi, bm, bn)
    bwd = key_block_bounds(lo, hi, bm, bn).long()
    span_f = int((fwd[..., 3] - fwd[..., 0]).clamp(min=0).sum())
    full_f = int((fwd[..., 2] - fwd[..., 1]).sum())
    span_b = int((bwd[..., 3] - bwd[..., 0]).clamp(min=0).sum())
    dense = B * cdiv(S, bm) * cdiv(S, bn)
    causal = B * causal_tile_count(S, bm, bn)
    hit, partial = mask_tile_counts(lo[:4], hi[:4], bm, bn)  # exactness check on a few rows
    f4 = query_block_bounds(lo[:4], hi[:4], bm, bn)
    assert int((f4[..., 3] - f4[..., 0]).clamp(min=0).sum()) == hit, "loop bounds != mask tiles"
    print(f"  tiles {label} ({bm} queries x {bn} keys), per row: dense {dense / B:.0f}, "
          f"causal-only {causal / B:.0f}, span kernel {span_f / B:.1f} "
          f"(loops per query block; per key block: {span_b / B:.1f})")
    print(f"    span/dense {span_f / dense:.3f}   span/causal {span_f / causal:.3f}   "
          f"element mask on {1 - full_f / span_f:.1%} of computed tiles")
    return {"span": span_f / B, "dense": dense / B, "causal": causal / B}


def flops_report(t: dict[str, float], bm: int, bn: int, heads: int, head_dim: int, layers: int) -> None:
    """Attention matmul FLOPs per row from tile counts (forward 2 matmuls per tile, backward 5:
    x3.5 for a training step), at the 7B shape."""
    per_tile = 4 * bm * bn * head_dim * heads * layers * 3.5
    tf = {k: v * per_tile / 1e12 for k, v in t.items()}
    print(f"  attention FLOPs per 4096-token row, fwd+bwd, {layers} layers x {heads} heads x d{head_dim}: "
          f"dense {tf['dense']:.2f} TF, causal {tf['causal']:.2f} TF, span {tf['span']:.2f} TF -> saves "
          f"{tf['dense'] - tf['span']:.2f} TF vs dense ({1 - tf['span'] / tf['dense']:.1%}), "
          f"{tf['causal'] - tf['span']:.2f} TF vs causal ({1 - tf['span'] / tf['causal']:.1%})")


def time_fn(fn, reps: int) -> float:
    """Median wall time of fn() in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--image-frac", type=float, default=0.5, help="share of documents with an image")
    ap.add_argument("--text-median", type=int, default=300, help="median text-only document length")
    ap.add_argument("--heads", type=int, default=2, help="heads for the CPU timing")
    ap.add_argument("--head-dim", type=int, default=32, help="head dim for the CPU timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="time eager flex only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    S = args.seq_len
    rows = [pack_row(rng, S, args.image_frac, args.text_median) for _ in range(args.rows)]
    lo, hi = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])  # [B, S]
    pad = (hi <= lo).float().mean().item()
    density = ((hi - lo).clamp(min=0).double().sum() / (args.rows * S * S)).item()
    print(f"{args.rows} rows x {S} tokens, image docs {args.image_frac:.0%}, text median "
          f"{args.text_median}: padding {pad:.1%}, "
          f"mask density {density:.3f} (causal-only would be ~0.5)")
    t = tile_report(lo, hi, 128, 64, "block 128x64")
    flops_report(t, 128, 64, heads=32, head_dim=128, layers=32)
    tile_report(lo, hi, 128, 32, "kernel bf16 d128 forward")
    tile_report(lo, hi, 32, 64, "kernel bf16 d128 backward")
    tile_report(lo, hi, 128, 128, "FlexAttention blocks")

    # CPU forward time: one row, small heads, both backends in the same process and conditions.
    H, D = args.heads, args.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, S, H, D, generator=gen) for _ in range(3))
    lo1, hi1 = lo[:1], hi[:1]
    t_mask = time_fn(lambda: build_span_block_mask(lo1, hi1), args.reps)
    t_cbm = time_fn(lambda: create_block_mask(span_mask_mod(lo1, hi1), 1, None, S, S, device="cpu"), 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        t_sdpa = time_fn(lambda: sdpa_span_attention(q, k, v, lo1, hi1), args.reps)
        t_eager = time_fn(lambda: flex_span_attention(q, k, v, lo1, hi1, compile=False), args.reps)
        print(f"CPU forward, 1 x {S} tokens x {H} heads x d{D}, {args.threads} thread(s), median of {args.reps}:")
        print(f"  sdpa reference {t_sdpa * 1e3:.1f} ms | flex eager {t_eager * 1e3:.1f} ms "
              f"(ratio sdpa/flex {t_sdpa / t_eager:.2f})")
        print(f"  BlockMask once per batch: from the spans {t_mask * 1e3:.1f} ms "
              f"(create_block_mask over S x S: {t_cbm * 1e3:.0f} ms)")
        if not args.no_compile:
            t0 = time.perf_counter()
            flex_span_attention(q, k, v, lo1, hi1, compile=True)
            t_compile = time.perf_counter() - t0
            t_comp = time_fn(lambda: flex_span_attention(q, k, v, lo1, hi1, compile=True), args.reps)
            print(f"  sdpa reference {t_sdpa * 1e3:.1f} ms | flex compiled {t_comp * 1e3:.1f} ms "
                  f"(ratio sdpa/flex {t_sdpa / t_comp:.2f}); first call incl. compile {t_compile:.1f} s")


if __name__ == "__main__":
    main()
