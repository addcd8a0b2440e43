"""The model FLOPs of a packed batch, measured on the model itself (one count for the whole project).

Model FLOPs are the work one training step of the network needs: forward + backward, no
recomputation (activation checkpointing and the chunked cross-entropy re-run forward work; that is
not model work). They feed the trainer's logged TFLOP/s and MFU, the planner's model-FLOP figures
and the equal-FLOPs ablations (benchmarks/ablations.py).

How the count is derived: `unit_flops(cfg)` builds `TransfusionModel(cfg)` on the meta device and
runs torch's `FlopCounterMode` (every matmul and convolution, a multiply-add = 2 FLOPs) over the
forward and then the backward of its parts, with inputs that need a gradient exactly where the
training step's do, so the backward is what autograd runs: 2x forward for a matmul whose input
needs a gradient, 1x (the weight gradient alone) for the layers fed by the noisy latents and the
timestep features. Measured per unit, once per config (cached):

- `blocks`: all transformer blocks, per sequence position (every B*S position is computed,
  padding included), with the attention op replaced by a stand-in that does no work;
- `lm_head`: the LM head per text target (the loss reads the head at target positions only,
  model/losses.py);
- `patch_codecs`: the patch encoder + decoder per latent image (images given as VQ tokens,
  `model.image_representation: tokens`, are ordinary positions: the batch holds no latents).

Span attention is counted from the batch's spans instead: each (query, key) pair inside a span costs
4 * head_dim FLOPs per head and layer forward (QK^T and PV) and twice that backward.
`batch_flops` combines the units with a batch's counts, which costs a few tensor reductions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from config import ModelConfig
from kernels.dispatch import register_backend, unregister_backend

from .batch import IGNORE_INDEX, PackedBatch
from .layers import rope_frequencies
from .transfusion import TransfusionModel


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __mul__(self, n: float) -> "Flops":
        return Flops(self.forward * n, self.backward * n)

    __rmul__ = __mul__


@dataclass(frozen=True)
class UnitFlops:
    """Model FLOPs per unit of work, measured on the model (`unit_flops`)."""

    per_position: Flops  # all transformer blocks except attention, per sequence position
    per_target: Flops  # the LM head, per text target
    per_image: Flops  # patch encoder + decoder, per latent image
    per_pair: Flops  # span attention in all layers, per (query, key) pair (from the config's heads)


_UNITS: dict[str, UnitFlops] = {}
_NO_ATTENTION = "_model_flops_no_attention"  # a stand-in backend, registered only while measuring
_N = 2  # units per measurement (every count is linear in it)


def unit_flops(cfg: ModelConfig) -> UnitFlops:
    """The per-unit model FLOPs of `cfg`, measured once per distinct config."""
    key = repr(cfg)
    if key not in _UNITS:
        _UNITS[key] = _measure(cfg)
    return _UNITS[key]


def batch_flops(cfg: ModelConfig, batch: PackedBatch) -> dict[str, Flops]:
    """Model FLOPs of one forward + backward of `batch`, by part."""
    u = unit_flops(cfg)
    return {
        "blocks": u.per_position * float(batch.tokens.numel()),
        "attention": u.per_pair * span_pairs(batch.kv_lo, batch.kv_hi),
        "lm_head": u.per_target * float((batch.text_targets != IGNORE_INDEX).sum()),
        "patch_codecs": u.per_image * float(batch.num_images),
    }


def step_model_flops(cfg: ModelConfig, batches: list[PackedBatch]) -> float:
    """Model FLOPs of one rank's step (its micro-batches); multiply by the data-parallel size for the
    global step. What the trainer logs as achieved FLOP/s and MFU."""
    return sum(f.total for b in batches for f in batch_flops(cfg, b).values())


def model_flops_per_token(cfg: ModelConfig, batch: PackedBatch | None = None, seq_len: int | None = None) -> float:
    """Model FLOPs (forward + backward, no recompute) per sequence position.

    With `batch`, from its spans, targets and images; without, for rows of `seq_len` (default
    max_seq_len) of causal text only, every position a target.
    """
    if batch is not None:
        return step_model_flops(cfg, [batch]) / batch.tokens.numel()
    u, S = unit_flops(cfg), seq_len or cfg.max_seq_len
    return u.per_position.total + u.per_target.total + u.per_pair.total * (S + 1) / 2


def span_pairs(kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> float:
    """(query, key) pairs inside the spans: what span attention computes."""
    return float((kv_hi.long() - kv_lo.long()).clamp(min=0).sum())


# ---------------------------------------------------------------------------------------------
# Measurement on the meta device.


class _NoAttention(torch.autograd.Function):
    """Stands in for span attention while measuring: shapes and gradients flow, no work is done."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: ANN001, ANN205
        ctx.kv = (k.shape, k.dtype)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        shape, dtype = ctx.kv
        return torch.empty_like(grad), grad.new_empty(shape, dtype=dtype), grad.new_empty(shape, dtype=dtype)


def _no_attention(q, k, v, kv_lo, kv_hi, scale=None):  # noqa: ANN001, ANN202
    return _NoAttention.apply(q, k, v)


@contextlib.contextmanager
def _attention_excluded(model: TransfusionModel) -> Iterator[None]:
    """Route the model's attention to the stand-in (never picked by `auto`), then remove it."""
    register_backend(_NO_ATTENTION, _no_attention, lambda q, kv_lo=None, kv_hi=None: None, 99, ())
    attns = [layer.attention for layer in model.layers.values()]
    saved = [a.backend for a in attns]
    try:
        for a in attns:
            a.backend = _NO_ATTENTION
        yield
    finally:
        for a, b in zip(attns, saved):
            a.backend = b
        unregister_backend(_NO_ATTENTION)


def _forward_backward(forward: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], n: int) -> Flops:
    """Counted FLOPs of forward() and of the backward from its outputs, per unit of n."""
    with FlopCounterMode(display=False) as fc:
        out = forward()
    fwd = fc.get_total_flops()
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    with FlopCounterMode(display=False) as fc:
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    return Flops(fwd / n, fc.get_total_flops() / n)


def _measure(cfg: ModelConfig) -> UnitFlops:
    meta = torch.device("meta")
    with meta:
        model = TransfusionModel(cfg)
    d, n = cfg.d_model, _N

    def blocks() -> torch.Tensor:
        # The first block's input (embeddings) needs a gradient in training: so does this one.
        h = torch.empty(1, n, d, device=meta, requires_grad=True)
        positions = torch.zeros(1, n, dtype=torch.long, device=meta)
        lo = torch.zeros(1, n, dtype=torch.int32, device=meta)
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, device=meta)
        for layer in model.layers.values():
            h = layer(h, positions, inv_freq, lo, lo + 1)
        return h

    def head() -> torch.Tensor:
        return model.output(torch.empty(n, d, device=meta, requires_grad=True))

    def codecs() -> torch.Tensor:
        # Noisy latents and timesteps need no gradient; the encoder's patches go through the
        # decoder (standing in for the blocks between them), so both backwards are complete.
        size = cfg.latent_size
        noisy = torch.empty(n, cfg.latent_channels, size, size, device=meta)
        t = torch.zeros(n, dtype=torch.long, device=meta)
        patches, skips = model.patch_encoder(noisy, t)  # [n, P, d]
        h = patches.reshape(1, -1, d)
        is_image = torch.ones(h.shape[:2], dtype=torch.bool)  # a CPU mask indexes a meta tensor
        return model.patch_decoder(h, is_image, t, skips)

    with torch.enable_grad():  # callers may sit in no_grad (evaluation): the backward is measured too
        with _attention_excluded(model):
            per_position = _forward_backward(blocks, n)
        per_target, per_image = _forward_backward(head, n), _forward_backward(codecs, n)
    attn = 4.0 * cfg.n_heads * cfg.head_dim * cfg.n_layers
    return UnitFlops(per_position, per_target, per_image, Flops(attn, 2 * attn))
