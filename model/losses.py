"""Transfusion objective: L = L_LM + lambda * L_DDPM, each term reported separately."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .batch import IGNORE_INDEX, PackedBatch
from .diffusion import NoiseSchedule
from .transfusion import ModelOutput, TransfusionModel


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


def transfusion_loss(
    out: ModelOutput, text_targets: torch.Tensor, noise: torch.Tensor, loss_weight: float,
    norm: LossNorm | None = None,
) -> LossOutput:
    """LM loss on positions with a target only; diffusion loss on image patches only.

    Without `norm`, means over this batch's text targets and images; with it, this batch's sums
    divided by the step's totals (summing the micro-batches' terms then gives the step's means).
    """
    logits = out.logits.float()
    n_text = int((text_targets != IGNORE_INDEX).sum())
    if n_text:
        lm = F.cross_entropy(logits.flatten(0, 1), text_targets.flatten(), ignore_index=IGNORE_INDEX)
    else:
        lm = logits.sum() * 0.0  # keeps the graph (and every rank's collectives) intact
    if isinstance(lm, DTensor):  # vocab-parallel logits (tensor parallel): a replicated scalar
        lm = lm.full_tensor()
    if noise.shape[0] > 0:
        per_image = (out.noise_pred.float() - noise.float()).pow(2).flatten(1).mean(1)  # [N_img]
        diffusion = per_image.mean()
    else:
        diffusion = out.noise_pred.sum() * 0.0
    if norm is not None:
        lm = lm * (n_text / max(norm.text_targets, 1))
        diffusion = diffusion * (noise.shape[0] / max(norm.images, 1))
    return LossOutput(lm + loss_weight * diffusion, lm, diffusion)


def training_forward(
    model: TransfusionModel, schedule: NoiseSchedule, batch: PackedBatch, loss_weight: float,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Noise the batch's latents, run the model and return the losses."""
    noisy, t, noise = schedule.sample_training_inputs(batch.latents, batch.image_max_t, generator)
    out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
    return transfusion_loss(out, batch.text_targets, noise, loss_weight)
