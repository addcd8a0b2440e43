"""Dense-mask SDPA reference for span attention: the ground truth and the CPU training path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def span_mask(kv_lo: torch.Tensor, kv_hi: torch.Tensor, num_keys: int | None = None) -> torch.Tensor:
    """Boolean mask [B, S_q, S_k]: True where key j lies in query i's span [kv_lo[i], kv_hi[i])."""
    num_keys = kv_lo.shape[-1] if num_keys is None else num_keys
    j = torch.arange(num_keys, device=kv_lo.device)
    return (j >= kv_lo[..., None]) & (j < kv_hi[..., None])


def sdpa_span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, S, H, D], k/v [B, S, H_kv, D], spans [B, S] -> [B, S, H, D].

    Queries with an empty span (padding) output zeros and receive zero gradient.
    """
    B, S, H, D = q.shape
    mask = span_mask(kv_lo, kv_hi, k.shape[1])  # [B, S, S]
    empty = kv_hi <= kv_lo  # [B, S]
    # An all-False softmax row is NaN in some SDPA backends (and poisons the backward); let empty
    # queries see key 0 and zero their output afterwards.
    mask[..., 0] |= empty
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[2] != H,
    ).transpose(1, 2)  # [B, S, H, D]
    return out * (~empty)[..., None, None].to(out.dtype)
