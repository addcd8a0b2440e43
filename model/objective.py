"""The training objective as one helper: noise the images, run the model, take L_LM + lambda * L_DDPM.

Every engine uses it (docs/architecture.md §6): the plain and DeepSpeed paths call it per
micro-batch; a pipeline draws the inputs before its schedule and applies the loss on the last stage.
Diffusion noise comes from a generator seeded by (seed, step, global micro-batch) with no two
micro-batches of a run sharing a seed (`noise_seed`), so a run is reproducible from its config and
a micro-batch gets the same noise on whichever rank runs it.
"""

from __future__ import annotations

from typing import Callable

import torch

from config import DiffusionConfig

from .batch import PackedBatch
from .diffusion import NoiseSchedule
from .losses import LmLossSum, LossNorm, LossOutput, lm_loss_sum, transfusion_loss
from .transfusion import ModelOutput


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, step: int, micro: int, micros_per_step: int) -> int:
    """The generator seed of global micro-batch `micro` (of `micros_per_step`) at `step`.

    The run's micro-batches are numbered densely (step * micros_per_step + micro) and offset by a
    scatter of the run seed, mod 2^64: within a run no two micro-batches share a seed while fewer
    than 2^64 have run (CUDA's Philox takes all 64 bits), nor while fewer than 2^32 have run on
    CPU, whose generator keeps only the low 32 bits of a seed (adding a constant is a bijection of
    the low bits too).
    """
    if not 0 <= micro < micros_per_step:
        raise ValueError(f"micro-batch {micro} is outside 0..{micros_per_step - 1}")
    return (_splitmix64(seed & _MASK64) + step * micros_per_step + micro) & _MASK64


def noise_generator(device: torch.device, seed: int, step: int, micro: int, micros_per_step: int = 1) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, global micro-batch): `noise_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(seed, step, micro, micros_per_step))
    return gen


class Objective:
    """noise -> forward -> loss for packed micro-batches.

    `lm_loss` sums the LM term; a layout that distributes the head or the hidden states (tensor
    parallelism, ZeRO-3) passes its own (parallel/), the default is the plain one.
    `micros_per_step` is the step's number of micro-batches over all data-parallel ranks.
    """

    def __init__(self, diffusion: DiffusionConfig, seed: int = 0, lm_loss: LmLossSum = lm_loss_sum,
                 micros_per_step: int = 1) -> None:
        self.schedule = NoiseSchedule(diffusion)
        self.loss_weight = diffusion.loss_weight
        self.seed = seed
        self.lm_loss = lm_loss
        self.micros_per_step = micros_per_step

    def inputs(self, batch: PackedBatch, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents [N, C, h, w], timesteps [N], the noise [N, C, h, w]) of micro-batch `micro` of `step`."""
        gen = noise_generator(batch.latents.device, self.seed, step, micro, self.micros_per_step)
        return self.schedule.sample_training_inputs(batch.latents, batch.image_max_t, gen)

    def loss(self, out: ModelOutput, text_targets: torch.Tensor, noise: torch.Tensor,
             norm: LossNorm | None = None, generated: torch.Tensor | None = None) -> LossOutput:
        return transfusion_loss(out, text_targets, noise, self.loss_weight, norm, self.lm_loss, generated)

    def __call__(self, model: Callable[..., ModelOutput], batch: PackedBatch, step: int, micro: int,
                 norm: LossNorm | None = None) -> LossOutput:
        """The micro-batch's losses; `model` is the network or anything that calls it with the
        network's arguments (an engine's wrapped call)."""
        noisy, t, noise = self.inputs(batch, step, micro)
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
        return self.loss(out, batch.text_targets, noise, norm, batch.generated)
