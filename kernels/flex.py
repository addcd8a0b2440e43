"""FlexAttention backend: a mask_mod from the spans and a BlockMask built once per batch.

The BlockMask comes straight from the span block arithmetic (`spans.query_block_bounds`), so
building it costs O(B * blocks^2) integers and never evaluates the mask_mod over S x S; it is cached
per (kv_lo, kv_hi) tensor pair, so every layer of a forward reuses it. FlexAttention has no backward
on CPU: there it serves inference only (training on CPU uses sdpa).
"""

from __future__ import annotations

from typing import Callable

import torch

from .spans import SpanCache, cdiv, query_block_bounds

FLEX_BLOCK = 128  # FlexAttention's sparse block size (queries and keys)
# torch.compile the flex call (fused kernel; on CPU ~30x faster than eager after a ~15 s compile).
COMPILE = True

_block_masks = SpanCache()
_compiled: dict[str, Callable] = {}


def flex_unavailable(q: torch.Tensor) -> str | None:
    """None when FlexAttention can run for tensors like `q` here, else the reason."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if q.device.type not in ("cuda", "cpu"):
        return f"FlexAttention runs on CUDA or CPU, not {q.device.type}"
    if q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        return "FlexAttention has no backward on CPU (inference only there; train with sdpa)"
    return None


def span_mask_mod(kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> Callable:
    """mask_mod(b, h, q_idx, kv_idx): key kv_idx lies in query q_idx's span of row b."""

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 (flex passes scalar tensors)
        return (kv_idx >= kv_lo[b, q_idx]) & (kv_idx < kv_hi[b, q_idx])

    return mask_mod


def _pack_indices(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """member [B, n_qb, n_kb] bool -> (num_blocks [B, 1, n_qb], indices [B, 1, n_qb, n_kb]) int32,
    each row's member key blocks first in increasing order."""
    order = torch.argsort((~member).to(torch.int8), dim=-1, stable=True)  # [B, n_qb, n_kb]
    return member.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None].contiguous()


def build_span_block_mask(
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, num_keys: int | None = None, block_size: int = FLEX_BLOCK
):
    """BlockMask of the span mask over num_keys (default S) keys: partial blocks carry the
    mask_mod, full blocks skip it."""
    from torch.nn.attention.flex_attention import BlockMask

    B, S = kv_lo.shape
    S_k = S if num_keys is None else num_keys
    lo = kv_lo.to(torch.int32).contiguous()
    hi = kv_hi.to(torch.int32).contiguous()
    bounds = query_block_bounds(lo, hi, block_size, block_size)  # [B, n_qb, 4]
    start, f0, f1, end = (bounds[..., i, None] for i in range(4))
    j = torch.arange(cdiv(S_k, block_size), device=lo.device)  # [n_kb]
    full = (j >= f0) & (j < f1)  # [B, n_qb, n_kb]
    partial = (j >= start) & (j < end) & ~full
    num, idx = _pack_indices(partial)
    full_num, full_idx = _pack_indices(full)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=span_mask_mod(lo, hi),
        seq_lengths=(S, S_k),
    )


def span_block_mask(kv_lo: torch.Tensor, kv_hi: torch.Tensor, num_keys: int | None = None):
    """The batch's BlockMask, built on first use and reused while kv_lo/kv_hi are the same tensors."""
    return _block_masks.get(
        kv_lo, kv_hi, (kv_lo.device, num_keys, FLEX_BLOCK), lambda: build_span_block_mask(kv_lo, kv_hi, num_keys)
    )


def _flex_fn(compile: bool) -> Callable:
    """flex_attention, eager or compiled with static shapes.

    Static shapes (`dynamic=False`): a call with a new (batch, length, ...) compiles a kernel for it.
    With torch's default, the second shape triggers a dynamic-shape recompile, and on CPU inductor
    then writes C++ that does not compile (torch 2.14.1). Training shapes are fixed, so this costs
    one compile per shape; past dynamo's recompile limit, torch runs flex eagerly (correct, slower).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["fn"]


def flex_span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    scale: float | None = None, compile: bool | None = None,
) -> torch.Tensor:
    """Span attention with FlexAttention: q [B, S, H, D], k/v [B, S_k, H_kv, D] -> [B, S, H, D].

    Rows with an empty span output zeros (and get zero gradient on GPU).
    """
    reason = flex_unavailable(q)
    if reason is None and q.device.type == "cpu" and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        reason = "FlexAttention has no backward on CPU (inference only there; train with sdpa)"
    if reason is not None:
        raise RuntimeError(f"flex span attention cannot run here: {reason}")
    if not torch.is_grad_enabled():  # flex refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = span_block_mask(kv_lo, kv_hi, k.shape[1])
    fn = _flex_fn(COMPILE if compile is None else compile)
    out = fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
        scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)  # [B, S, H, D]
    nonempty = (kv_hi > kv_lo).to(out.dtype)  # [B, S]
    return out * nonempty[..., None, None]
