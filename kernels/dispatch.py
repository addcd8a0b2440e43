"""`span_attention`: the single attention entry point of the model, with backend selection.

Backends register here; `auto` picks the best one that can run for the tensors' device and
whether gradients are needed. Further backends (triton, flex, flash) plug into `_BACKENDS`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .reference import sdpa_span_attention

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]

# name -> (function, why-unavailable probe returning None when usable)
_BACKENDS: dict[str, tuple[AttentionFn, Callable[[torch.Tensor], str | None]]] = {
    "sdpa": (sdpa_span_attention, lambda q: None),
}
# Preference order for `auto`, best first.
_AUTO_ORDER = ["sdpa"]
_logged_choice: set[tuple[str, str]] = set()


def available_backends(q: torch.Tensor) -> list[str]:
    """Backends that can run for a query tensor like `q` here, best first."""
    return [n for n in _AUTO_ORDER if _BACKENDS[n][1](q) is None]


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """Map `auto` to a concrete backend; fail with the reason if a named one cannot run."""
    if name == "auto":
        choice = available_backends(q)[0]
        key = (str(q.device.type), choice)
        if key not in _logged_choice:
            _logged_choice.add(key)
            log.info("span_attention: auto selected backend '%s' on %s", choice, q.device.type)
        return choice
    if name not in _BACKENDS:
        raise ValueError(
            f"attention backend '{name}' is not available in this build; known: {sorted(_BACKENDS)}"
        )
    reason = _BACKENDS[name][1](q)
    if reason is not None:
        raise RuntimeError(f"attention backend '{name}' cannot run here: {reason}")
    return name


def span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
    backend: str = "auto", scale: float | None = None,
) -> torch.Tensor:
    """Attention where query i sees keys [kv_lo[i], kv_hi[i]).

    q [B, S, H, D], k/v [B, S_k, H_kv, D] (H divisible by H_kv), kv_lo/kv_hi [B, S] int32,
    non-decreasing along S. Returns [B, S, H, D]; empty spans give zeros.
    """
    name = resolve_backend(backend, q)
    return _BACKENDS[name][0](q, k, v, kv_lo, kv_hi, scale=scale)
