"""Optional flash-attn backend for batches whose spans are plain document-causal (text-only rows).

flash_attn_varlen_func takes the non-padding tokens of all rows concatenated, with `cu_seqlens`
marking document boundaries, and applies a causal mask inside each document. Image spans
(bidirectional blocks) cannot be expressed that way, so such batches go to another backend.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .spans import SpanCache, is_document_causal

_doc_causal = SpanCache()


@functools.lru_cache(maxsize=None)
def flash_attn_installed() -> bool:
    """True when the flash_attn package can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def batch_is_document_causal(kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> bool:
    """`spans.is_document_causal`, cached per span tensors (it syncs with the device)."""
    return _doc_causal.get(kv_lo, kv_hi, "causal", lambda: is_document_causal(kv_lo, kv_hi))


def flash_unavailable(
    q: torch.Tensor, kv_lo: torch.Tensor | None = None, kv_hi: torch.Tensor | None = None
) -> str | None:
    """None when flash-attn can run for `q` (and, if given, these spans), else the reason."""
    if q.device.type != "cuda":
        return f"flash-attn needs a CUDA GPU (tensors are on {q.device.type})"
    if not flash_attn_installed():
        return "the optional 'flash_attn' package is not installed (pip install flash-attn)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16 inputs, got {q.dtype}"
    if kv_lo is not None and kv_hi is not None and not batch_is_document_causal(kv_lo, kv_hi):
        return "the batch has non-causal spans (images); flash-attn handles document-causal rows only"
    return None


def cu_seqlens_from_spans(kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Varlen layout of document-causal spans [B, S].

    Returns (token_index [N] int64 into the flattened B*S positions of the non-empty rows,
    cu_seqlens [n_docs + 1] int32 over those N tokens, max_seqlen). A document starts at every
    non-empty row with kv_lo[i] == i.
    """
    B, S = kv_lo.shape
    i = torch.arange(S, device=kv_lo.device)
    nonempty = (kv_hi > kv_lo).flatten()  # [B*S]
    starts = (kv_lo == i).flatten()[nonempty]  # [N] bool, in packed order
    token_index = nonempty.nonzero().squeeze(1)
    n = token_index.numel()
    bounds = torch.cat([starts.nonzero().squeeze(1), torch.tensor([n], device=kv_lo.device)])
    cu_seqlens = bounds.to(torch.int32)
    max_seqlen = int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0
    return token_index, cu_seqlens, max_seqlen


def flash_span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Span attention via flash_attn_varlen_func for document-causal spans -> [B, S, H, D]."""
    reason = flash_unavailable(q, kv_lo, kv_hi)
    if reason is not None:
        raise RuntimeError(f"flash span attention cannot run here: {reason}")
    from flash_attn import flash_attn_varlen_func

    B, S, H, D = q.shape
    if k.shape[1] != S:
        raise RuntimeError(f"flash span attention needs as many keys as queries, got {k.shape[1]} vs {S}")
    # Once per batch: every layer reuses the layout (it needs host syncs).
    token_index, cu, max_len = _doc_causal.get(kv_lo, kv_hi, "varlen", lambda: cu_seqlens_from_spans(kv_lo, kv_hi))
    out = q.new_zeros(B * S, H, D)  # padding rows stay zero
    if token_index.numel() == 0:
        return out.view(B, S, H, D)
    packed = flash_attn_varlen_func(
        q.reshape(B * S, H, D)[token_index], k.reshape(B * S, -1, D)[token_index],
        v.reshape(B * S, -1, D)[token_index], cu, cu, max_len, max_len,
        dropout_p=0.0, softmax_scale=scale, causal=True,
    )  # [N, H, D]
    return out.index_copy(0, token_index, packed).view(B, S, H, D)
