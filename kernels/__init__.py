"""Attention over packed sequences where each query attends to one contiguous key span.

Backends: triton (span-skipping flash kernel), flex (FlexAttention), flash (flash-attn varlen,
document-causal batches), sdpa (dense-mask reference). Triton is imported only when first used.
"""

from .dispatch import available_backends, backend_unavailable, register_backend, resolve_backend, span_attention
from .reference import sdpa_span_attention, span_mask

__all__ = [
    "span_attention", "available_backends", "backend_unavailable", "register_backend",
    "resolve_backend", "sdpa_span_attention", "span_mask",
]
