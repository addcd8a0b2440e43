"""Model FLOPs counted from the config's shapes and a batch's spans (independent of any run).

The planner measures FLOPs by counting every matmul/convolution of a fake step; this module counts
the same work from the architecture on paper, to check the measurement and for the trainer's MFU
log (`model_flops_per_token`). Conventions: a multiply-add is 2 FLOPs; backward costs 2x forward,
except layers whose input needs no gradient (first conv/linear on the noisy latents, the first
layer of the timestep MLPs), whose backward is only the weight gradient (1x); attention counts the
(query, key) pairs inside the spans (4 FLOPs x head_dim per pair forward: QK^T and PV); the LM
head runs on positions with a text target only; recomputation (activation checkpointing) is not
model work and is excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.batch import IGNORE_INDEX, PackedBatch
from config import ModelConfig


@dataclass
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _dense(n_in: int, n_out: int, rows: float, input_grad: bool = True) -> Flops:
    f = 2.0 * n_in * n_out * rows
    return Flops(f, f * (2 if input_grad else 1))


def _conv(cin: int, cout: int, k: int, out_hw: int, n: float, input_grad: bool = True) -> Flops:
    f = 2.0 * cin * cout * k * k * out_hw * n
    return Flops(f, f * (2 if input_grad else 1))


def _sum(parts: list[Flops]) -> Flops:
    return Flops(sum(p.forward for p in parts), sum(p.backward for p in parts))


def _time_mlp(freq: int, dim: int, n: float) -> list[Flops]:
    return [_dense(freq, dim, n, input_grad=False), _dense(dim, dim, n)]


def codec_flops(cfg: ModelConfig, n_images: float) -> Flops:
    """Patch encoder + decoder work for n_images images."""
    P, d, C = cfg.patches_per_image, cfg.d_model, cfg.latent_channels
    if cfg.patch_codec == "linear":
        p2 = C * cfg.patch_size ** 2
        return _sum([_dense(p2, d, n_images * P, input_grad=False), *_time_mlp(256, d, n_images),
                     _dense(d, p2, n_images * P)])
    ch, L = cfg.unet_channels, cfg.unet_layers_per_level
    temb = 4 * ch[0]
    parts: list[Flops] = []

    def resnet(cin: int, c: int, hw: int) -> None:
        parts.extend([_conv(cin, c, 3, hw, n_images), _conv(c, c, 3, hw, n_images), _dense(temb, 2 * c, n_images)])
        if cin != c:
            parts.append(_conv(cin, c, 1, hw, n_images))

    size = cfg.latent_size
    # encoder
    parts.extend(_time_mlp(ch[0], temb, n_images))
    parts.append(_conv(C, ch[0], 3, size * size, n_images, input_grad=False))
    cin = ch[0]
    for i, c in enumerate(ch):
        hw = (size >> i) ** 2
        for r in range(L):
            resnet(cin if r == 0 else c, c, hw)
        cin = c
        if i < len(ch) - 1:
            parts.append(_conv(c, c, 3, (size >> (i + 1)) ** 2, n_images))
    parts.append(_dense(ch[-1], d, n_images * P))
    # decoder
    parts.extend(_time_mlp(ch[0], temb, n_images))
    parts.append(_dense(d, ch[-1], n_images * P))
    cin = ch[-1]
    for i in reversed(range(len(ch))):
        c, hw = ch[i], (size >> i) ** 2
        for r in range(L):
            resnet(cin + c if r == 0 else c, c, hw)
        cin = c
        if i > 0:
            parts.append(_conv(c, ch[i - 1], 3, (size >> (i - 1)) ** 2, n_images))
            cin = ch[i - 1]
    parts.append(_conv(ch[0], C, 3, size * size, n_images))
    return _sum(parts)


def block_flops(cfg: ModelConfig, positions: float, attended_pairs: float) -> Flops:
    """All transformer blocks: projections and MLP on every position, attention on the span pairs."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = [
        _dense(d, cfg.n_heads * hd, positions), _dense(d, cfg.kv_heads * hd, positions),
        _dense(d, cfg.kv_heads * hd, positions), _dense(cfg.n_heads * hd, d, positions),
        _dense(d, cfg.hidden_dim, positions), _dense(d, cfg.hidden_dim, positions),
        _dense(cfg.hidden_dim, d, positions),
    ]
    attn = 4.0 * attended_pairs * cfg.n_heads * hd
    layer = _sum(per_layer)
    return Flops(cfg.n_layers * (layer.forward + attn), cfg.n_layers * (layer.backward + 2 * attn))


def batch_flops(cfg: ModelConfig, batch: PackedBatch) -> dict[str, Flops]:
    """Model FLOPs of one forward + backward of `batch`, by part."""
    positions = float(batch.tokens.numel())
    pairs = float((batch.kv_hi.long() - batch.kv_lo.long()).clamp(min=0).sum())
    targets = float((batch.text_targets != IGNORE_INDEX).sum())
    return {
        "blocks": block_flops(cfg, positions, pairs),
        "lm_head": _dense(cfg.d_model, cfg.vocab_size, targets),
        "patch_codecs": codec_flops(cfg, float(batch.num_images)),
    }


def step_model_flops(cfg: ModelConfig, batches: list[PackedBatch]) -> float:
    """Model FLOPs of one rank's step (its micro-batches); multiply by the data-parallel size for the
    global step. What the trainer logs as achieved FLOP/s and MFU (see README: Planning)."""
    return sum(f.total for b in batches for f in batch_flops(cfg, b).values())


def model_flops_per_token(cfg: ModelConfig, batch: PackedBatch | None = None, seq_len: int | None = None) -> float:
    """Model FLOPs (forward + backward, no recompute) per sequence position, for MFU logging.

    With `batch`, from its real spans, targets and images (what the planner counts); without, for
    rows of `seq_len` (default max_seq_len) of causal text only, every position a target.
    """
    if batch is None:
        S = seq_len or cfg.max_seq_len
        pairs = S * (S + 1) / 2
        parts = [block_flops(cfg, S, pairs), _dense(cfg.d_model, cfg.vocab_size, S)]
        return sum(p.total for p in parts) / S
    return sum(f.total for f in batch_flops(cfg, batch).values()) / batch.tokens.numel()

