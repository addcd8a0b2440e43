"""Llama-2-style decoder block: pre-RMSNorm, RoPE attention over span masks, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import span_attention

from .config import ModelConfig


def rope_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] of rotary embeddings."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by angles position_ids [B, S] * inv_freq (pairs (2i, 2i+1)), in fp32."""
    angles = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # [B, S, 1, D/2]
    xf = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with GQA; all masking is expressed as per-query key spans."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.backend = cfg.attention
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
        kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        # Head counts come from the weights so that a tensor-parallel shard sees its local heads.
        q = self.wq(x).view(B, S, -1, self.head_dim)  # [B, S, H, D]
        k = self.wk(x).view(B, S, -1, self.head_dim)  # [B, S, H_kv, D]
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k = apply_rope(q, position_ids, inv_freq), apply_rope(k, position_ids, inv_freq)
        out = span_attention(q, k, v, kv_lo, kv_hi, backend=self.backend)  # [B, S, H, D]
        return self.wo(out.flatten(2))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.d_model, cfg.hidden_dim)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
        kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), position_ids, inv_freq, kv_lo, kv_hi)
        return x + self.feed_forward(self.ffn_norm(x))
