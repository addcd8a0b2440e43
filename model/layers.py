"""Llama-2-style decoder block: pre-RMSNorm, RoPE attention over span masks, SwiGLU MLP."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import span_attention

from config import ModelConfig


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


class KVCache:
    """Keys/values of positions already run through the model, per layer: [B, S_cached, H_kv, D].

    Inference only. A forward given a cache attends over the cached keys followed by the new ones
    (so kv_lo/kv_hi index that concatenation) and appends the new keys, unless `frozen` (diffusion
    steps re-run noisy patches against a fixed prefix). Keys are stored after RoPE.

    Storage: per layer a preallocated buffer [B, capacity, H_kv, D]; `keys[name]` / `values[name]`
    are views of its first S_cached positions. New positions are written after them (capacity grows
    by half again or more), so appending a token or re-running an image's patches against a frozen prefix
    copies only the new positions, never the prefix. Tensors assigned into `keys`/`values` from
    outside (stacking, row selection) are adopted and copied into a buffer on the next write.
    """

    def __init__(self) -> None:
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.frozen = False
        self._bufs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        """Number of cached positions (0 for an empty cache)."""
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def layer(self, name: str) -> "LayerKVCache":
        return LayerKVCache(self, name)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "KVCache":
        """A new cache with `fn` applied to every key and value tensor (row selection, padding)."""
        out = KVCache()
        out.keys = {n: fn(t) for n, t in self.keys.items()}
        out.values = {n: fn(t) for n, t in self.values.items()}
        return out

    def _buffers(self, name: str, k: torch.Tensor, v: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This layer's buffers with room for `needed` positions, holding the cached prefix; and its length."""
        cached_k, cached_v = self.keys.get(name), self.values.get(name)
        n_cached = 0 if cached_k is None else cached_k.shape[1]
        buf = self._bufs.get(name)
        owned = buf is not None and cached_k is not None and _is_prefix_of(cached_k, buf[0]) and _is_prefix_of(cached_v, buf[1])
        if owned and buf[0].shape[1] >= needed and buf[0].shape[0] == k.shape[0]:
            return buf[0], buf[1], n_cached
        cap = max(16, needed + max(needed, 2 * n_cached) // 2)  # headroom: amortised O(1) appends
        B, _, H, D = k.shape
        bk = k.new_empty((B, cap, H, D))
        bv = v.new_empty((B, cap, v.shape[2], v.shape[3]))
        if n_cached:
            bk[:, :n_cached] = cached_k
            bv[:, :n_cached] = cached_v
        self._bufs[name] = (bk, bv)
        return bk, bv, n_cached


def _is_prefix_of(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """True when `view` is buf[:, :n] (same storage, offset and strides)."""
    return (view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and view.storage_offset() == buf.storage_offset() and view.stride() == buf.stride()
            and view.shape[0] == buf.shape[0] and view.shape[2:] == buf.shape[2:])


class LayerKVCache:
    """One layer's view of a KVCache."""

    def __init__(self, cache: KVCache, name: str) -> None:
        self.cache, self.name = cache, name

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached + new keys and values [B, S_cached + S, H_kv, D] (views of the layer's buffer);
        stores them unless frozen (then the new positions are scratch, overwritten next call)."""
        c = self.cache
        n = k.shape[1]
        bk, bv, start = c._buffers(self.name, k, v, (c.keys[self.name].shape[1] if self.name in c.keys else 0) + n)
        bk[:, start:start + n] = k
        bv[:, start:start + n] = v
        k_all, v_all = bk[:, :start + n], bv[:, :start + n]
        if not c.frozen:
            c.keys[self.name], c.values[self.name] = k_all, v_all
        return k_all, v_all


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
        kv_lo: torch.Tensor, kv_hi: torch.Tensor, cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        # Head counts come from the weights so that a tensor-parallel shard sees its local heads.
        q = self.wq(x).view(B, S, -1, self.head_dim)  # [B, S, H, D]
        k = self.wk(x).view(B, S, -1, self.head_dim)  # [B, S, H_kv, D]
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k = apply_rope(q, position_ids, inv_freq), apply_rope(k, position_ids, inv_freq)
        if cache is not None:  # inference: prepend the cached keys; spans index the concatenation
            k, v = cache.extend(k, v)  # [B, S_cached + S, H_kv, D]
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
        kv_lo: torch.Tensor, kv_hi: torch.Tensor, cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), position_ids, inv_freq, kv_lo, kv_hi, cache)
        return x + self.feed_forward(self.ffn_norm(x))
