"""`span_attention`: the single attention entry point of the model, with backend selection.

Backends register here with a probe that says why they cannot run (None when they can) for a query
tensor and, optionally, the batch's spans. `auto` picks the first usable backend in preference order
among those allowed on the tensors' device: on CUDA flash (document-causal batches, flash_attn
installed) > triton > flex > sdpa; on CPU always sdpa (the interpreter and eager flex are far slower,
and flex has no CPU backward), though triton (TRITON_INTERPRET=1) and flex can be named explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .flash import flash_span_attention, flash_unavailable
from .flex import flex_unavailable
from .reference import sdpa_span_attention
from .triton_span import triton_unavailable

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]
# probe(q, kv_lo, kv_hi) -> None when usable, else the reason; the spans may be None.
Probe = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], "str | None"]


@dataclass(frozen=True)
class Backend:
    fn: AttentionFn
    unavailable: Probe
    auto_devices: tuple[str, ...] | None  # device types where `auto` may pick it; None = any


_BACKENDS: dict[str, Backend] = {}
# Preference order for `auto`, best first.
_AUTO_ORDER: list[str] = []
_logged_choice: set[tuple[str, str]] = set()


def register_backend(
    name: str, fn: AttentionFn, unavailable: Probe, priority: int,
    auto_devices: tuple[str, ...] | None = None,
) -> None:
    """Add a backend; `priority` is its index in the `auto` preference order."""
    _BACKENDS[name] = Backend(fn, unavailable, auto_devices)
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)
    _AUTO_ORDER.insert(priority, name)


def unregister_backend(name: str) -> None:
    """Remove a backend added with register_backend (e.g. a tool's stand-in, when the tool is done)."""
    _BACKENDS.pop(name, None)
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)


def backend_unavailable(
    name: str, q: torch.Tensor, kv_lo: torch.Tensor | None = None, kv_hi: torch.Tensor | None = None
) -> str | None:
    """Why backend `name` cannot run for `q` (and these spans), or None when it can."""
    if name not in _BACKENDS:
        return f"unknown attention backend '{name}'; known: {sorted(_BACKENDS)}"
    return _BACKENDS[name].unavailable(q, kv_lo, kv_hi)


def available_backends(
    q: torch.Tensor, kv_lo: torch.Tensor | None = None, kv_hi: torch.Tensor | None = None,
    auto_only: bool = False,
) -> list[str]:
    """Backends that can run for a query tensor like `q` here, best first.

    auto_only=True keeps only those `auto` may pick on q's device.
    """
    names = []
    for n in _AUTO_ORDER:
        be = _BACKENDS[n]
        if auto_only and be.auto_devices is not None and q.device.type not in be.auto_devices:
            continue
        if be.unavailable(q, kv_lo, kv_hi) is None:
            names.append(n)
    return names


def resolve_backend(
    name: str, q: torch.Tensor, kv_lo: torch.Tensor | None = None, kv_hi: torch.Tensor | None = None
) -> str:
    """Map `auto` to a concrete backend; fail with the reason if a named one cannot run."""
    if name == "auto":
        choice = available_backends(q, kv_lo, kv_hi, auto_only=True)[0]
        key = (str(q.device.type), choice)
        if key not in _logged_choice:
            _logged_choice.add(key)
            log.info("span_attention: auto selected backend '%s' on %s", choice, q.device.type)
        return choice
    if name not in _BACKENDS:
        raise ValueError(
            f"attention backend '{name}' is not available in this build; known: {sorted(_BACKENDS)}"
        )
    reason = _BACKENDS[name].unavailable(q, kv_lo, kv_hi)
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
    name = resolve_backend(backend, q, kv_lo, kv_hi)
    return _BACKENDS[name].fn(q, k, v, kv_lo, kv_hi, scale=scale)


def _triton_fn(q, k, v, kv_lo, kv_hi, scale=None):  # noqa: ANN001, ANN202
    from .triton_span import triton_span_attention

    return triton_span_attention(q, k, v, kv_lo, kv_hi, scale=scale)


def _flex_fn(q, k, v, kv_lo, kv_hi, scale=None):  # noqa: ANN001, ANN202
    from .flex import flex_span_attention

    return flex_span_attention(q, k, v, kv_lo, kv_hi, scale=scale)


register_backend("sdpa", sdpa_span_attention, lambda q, kv_lo=None, kv_hi=None: None, 0)
register_backend("flex", _flex_fn, lambda q, kv_lo=None, kv_hi=None: flex_unavailable(q), 0, ("cuda",))
register_backend("triton", _triton_fn, lambda q, kv_lo=None, kv_hi=None: triton_unavailable(q), 0, ("cuda",))
register_backend("flash", flash_span_attention, flash_unavailable, 0, ("cuda",))
