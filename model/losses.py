"""Transfusion objective: L = L_LM + lambda * L_DDPM, each term reported separately."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.utils.checkpoint import checkpoint

from .batch import IGNORE_INDEX
from .transfusion import ModelOutput


@dataclass(frozen=True)
class LossNorm:
    """Denominators for a step of several micro-batches (and data-parallel ranks): its total number
    of text targets and of images, so every token and every image weighs the same in the step."""

    text_targets: int
    images: int


@dataclass
class LossOutput:
    total: torch.Tensor
    lm: torch.Tensor  # mean cross-entropy per text target
    diffusion: torch.Tensor  # mean over images of the per-image epsilon MSE


# Rows of logits materialised at once by the chunked cross-entropy: 4096 x 32000 fp32 = 0.5 GiB.
LM_CHUNK_ROWS = 4096


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits rows [N, V] (any dtype, upcast here) against targets [N]."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _head_ce_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp_mesh) -> torch.Tensor:  # noqa: ANN001
    """LM head on hidden rows h [N, d] then summed cross-entropy; vocab-parallel under tensor parallel."""
    logits = F.linear(h, weight)  # [N, V] (local vocab shard under TP)
    if tp_mesh is not None:
        logits = DTensor.from_local(logits, tp_mesh, [Shard(1)], run_check=False)
    return _ce_sum(logits, targets)


def lm_loss_sum(out: ModelOutput, text_targets: torch.Tensor, chunk: int = LM_CHUNK_ROWS) -> torch.Tensor:
    """Sum of the cross-entropy over the positions with a text target, never holding all logits.

    With hidden states + head: the head runs on the target positions only, in chunks of `chunk`
    rows, each checkpointed (its logits are recomputed in backward rather than kept). Under tensor
    parallelism (DTensor hidden states, vocab-sharded head) the hidden states are gathered once and
    each chunk's logits stay vocab-sharded for the loss_parallel cross-entropy. With precomputed
    logits (DeepSpeed ZeRO-3), the same chunking runs over their rows.
    """
    flat_t = text_targets.flatten()
    if out._logits is not None:
        logits = out._logits.flatten(0, 1)
        parts = [checkpoint(_ce_sum, logits[i:i + chunk], flat_t[i:i + chunk], use_reentrant=False)
                 for i in range(0, flat_t.numel(), chunk)]
        total = torch.stack([p.full_tensor() if isinstance(p, DTensor) else p for p in parts]).sum()
        return total
    h, weight, tp_mesh = out.hidden, out.head.weight, None
    if isinstance(weight, DTensor):
        tp_mesh = weight.device_mesh
        weight = weight.to_local()
    if isinstance(h, DTensor):
        # Gathered along the sequence; each rank's gradient covers its vocab shard only (Partial).
        h = h.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    idx = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    h_sel = h.flatten(0, 1).index_select(0, idx)  # [N_targets, d]
    t_sel = flat_t.index_select(0, idx)
    parts = [checkpoint(_head_ce_sum, h_sel[i:i + chunk], weight, t_sel[i:i + chunk], tp_mesh, use_reentrant=False)
             for i in range(0, idx.numel(), chunk)]
    if not parts:  # keeps the graph (and every rank's collectives) intact
        return (h.sum() + weight.sum()) * 0.0
    return torch.stack([p.full_tensor() if isinstance(p, DTensor) else p for p in parts]).sum()


def transfusion_loss(
    out: ModelOutput, text_targets: torch.Tensor, noise: torch.Tensor, loss_weight: float,
    norm: LossNorm | None = None,
) -> LossOutput:
    """LM loss on positions with a target only; diffusion loss on image patches only.

    Without `norm`, means over this batch's text targets and images; with it, this batch's sums
    divided by the step's totals (summing the micro-batches' terms then gives the step's means).
    """
    n_text = int((text_targets != IGNORE_INDEX).sum())
    lm = lm_loss_sum(out, text_targets) / max(n_text, 1)
    if noise.shape[0] > 0:
        per_image = (out.noise_pred.float() - noise.float()).pow(2).flatten(1).mean(1)  # [N_img]
        diffusion = per_image.mean()
    else:
        diffusion = out.noise_pred.sum() * 0.0
    if norm is not None:
        lm = lm * (n_text / max(norm.text_targets, 1))
        diffusion = diffusion * (noise.shape[0] / max(norm.images, 1))
    return LossOutput(lm + loss_weight * diffusion, lm, diffusion)
