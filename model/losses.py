"""Transfusion objective: L = L_LM + lambda * L_DDPM, each term reported separately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .batch import IGNORE_INDEX
from .transfusion import ModelOutput


@dataclass(frozen=True)
class LossNorm:
    """Denominators for a step of several micro-batches (and data-parallel ranks): its total number
    of text targets and of generated images, so every token and every image weighs the same in the step."""

    text_targets: int
    images: int


@dataclass
class LossOutput:
    total: torch.Tensor
    lm: torch.Tensor  # mean cross-entropy per text target
    diffusion: torch.Tensor  # mean over images of the per-image epsilon MSE


# Rows of logits materialised at once by the chunked cross-entropy: 4096 x 32000 fp32 = 0.5 GiB.
LM_CHUNK_ROWS = 4096

# How the LM term is summed: (output, text targets [B, S], chunk rows) -> summed cross-entropy [].
# A layout whose head or hidden states are distributed supplies its own (parallel/); the model's is plain.
LmLossSum = Callable[[ModelOutput, torch.Tensor, int], torch.Tensor]


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits rows [N, V] (any dtype, upcast here) against targets [N]."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def head_ce_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LM head weight [V, d] on hidden rows h [N, d], then the summed cross-entropy against targets [N]."""
    return ce_sum(F.linear(h, weight), targets)


HeadCe = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_head_ce(h: torch.Tensor, weight: torch.Tensor, text_targets: torch.Tensor, chunk: int,
                    head_ce: HeadCe = head_ce_sum) -> torch.Tensor:
    """Summed cross-entropy over the positions of h [B, S, d] with a text target, never holding all logits.

    The head runs on the target rows only, `chunk` rows at a time, each chunk checkpointed (its logits
    are recomputed in backward rather than kept). `head_ce` maps (rows, weight, targets) to a sum.
    """
    flat_t = text_targets.flatten()
    idx = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    h_sel = h.flatten(0, 1).index_select(0, idx)  # [N_targets, d]
    t_sel = flat_t.index_select(0, idx)
    parts = [checkpoint(head_ce, h_sel[i:i + chunk], weight, t_sel[i:i + chunk], use_reentrant=False)
             for i in range(0, idx.numel(), chunk)]
    if not parts:  # keeps the graph (and every rank's collectives) intact
        return (h.sum() + weight.sum()) * 0.0
    return torch.stack(parts).sum()


def lm_loss_sum(out: ModelOutput, text_targets: torch.Tensor, chunk: int = LM_CHUNK_ROWS) -> torch.Tensor:
    """Sum of the cross-entropy over the positions with a text target (`chunked_head_ce` of the
    final-normed hidden states and the LM head)."""
    return chunked_head_ce(out.hidden, out.head.weight, text_targets, chunk)


def per_image_mse(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Each image's epsilon MSE [N_img] (fp32) of predicted noise against the true noise [N_img, C, h, w]."""
    return (noise_pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def transfusion_loss(
    out: ModelOutput, text_targets: torch.Tensor, noise: torch.Tensor, loss_weight: float,
    norm: LossNorm | None = None, lm_loss: LmLossSum = lm_loss_sum, generated: torch.Tensor | None = None,
) -> LossOutput:
    """LM loss on positions with a target only; diffusion loss on generated images only
    (`generated` [N_img] bool; None: all of them; condition images carry none).

    Without `norm`, means over this batch's text targets and generated images; with it, this batch's
    sums divided by the step's totals (summing the micro-batches' terms then gives the step's means).
    """
    n_text = int((text_targets != IGNORE_INDEX).sum())
    lm = lm_loss(out, text_targets, LM_CHUNK_ROWS) / max(n_text, 1)
    noise_pred = out.noise_pred
    if generated is not None and not bool(generated.all()):
        noise_pred, noise = noise_pred[generated], noise[generated]
    if noise.shape[0] > 0:
        diffusion = per_image_mse(noise_pred, noise).mean()
    else:
        diffusion = out.noise_pred.sum() * 0.0
    if norm is not None:
        lm = lm * (n_text / max(norm.text_targets, 1))
        diffusion = diffusion * (noise.shape[0] / max(norm.images, 1))
    return LossOutput(lm + loss_weight * diffusion, lm, diffusion)
