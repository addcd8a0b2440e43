"""The training objective as one helper: noise the images, run the model, take L_LM + lambda * L_DDPM.

Every engine uses it (docs/architecture.md §6): the plain and DeepSpeed paths call it per
micro-batch; a pipeline draws the inputs before its schedule and applies the loss on the last stage.
Diffusion noise comes from a generator seeded by (seed, step, global micro-batch), so a run is
reproducible from its config and a micro-batch gets the same noise on whichever rank runs it.
"""

from __future__ import annotations

from typing import Callable

import torch

from config import DiffusionConfig

from .batch import PackedBatch
from .diffusion import NoiseSchedule
from .losses import LmLossSum, LossNorm, LossOutput, lm_loss_sum, transfusion_loss
from .transfusion import ModelOutput


def noise_generator(device: torch.device, seed: int, step: int, micro: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, global micro-batch)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 1009 + micro)
    return gen


class Objective:
    """noise -> forward -> loss for packed micro-batches.

    `lm_loss` sums the LM term; a layout that distributes the head or the hidden states (tensor
    parallelism, ZeRO-3) passes its own (parallel/), the default is the plain one.
    """

    def __init__(self, diffusion: DiffusionConfig, seed: int = 0, lm_loss: LmLossSum = lm_loss_sum) -> None:
        self.schedule = NoiseSchedule(diffusion)
        self.loss_weight = diffusion.loss_weight
        self.seed = seed
        self.lm_loss = lm_loss

    def inputs(self, batch: PackedBatch, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents [N, C, h, w], timesteps [N], the noise [N, C, h, w]) of micro-batch `micro` of `step`."""
        gen = noise_generator(batch.latents.device, self.seed, step, micro)
        return self.schedule.sample_training_inputs(batch.latents, batch.image_max_t, gen)

    def loss(self, out: ModelOutput, text_targets: torch.Tensor, noise: torch.Tensor,
             norm: LossNorm | None = None) -> LossOutput:
        return transfusion_loss(out, text_targets, noise, self.loss_weight, norm, self.lm_loss)

    def __call__(self, model: Callable[..., ModelOutput], batch: PackedBatch, step: int, micro: int,
                 norm: LossNorm | None = None) -> LossOutput:
        """The micro-batch's losses; `model` is the network or anything that calls it with the
        network's arguments (an engine's wrapped call)."""
        noisy, t, noise = self.inputs(batch, step, micro)
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
        return self.loss(out, batch.text_targets, noise, norm)
