"""Attention over packed sequences where each query attends to one contiguous key span."""

from .dispatch import available_backends, span_attention
from .reference import sdpa_span_attention, span_mask

__all__ = ["span_attention", "available_backends", "sdpa_span_attention", "span_mask"]
