"""Sampling rules: next-token choice (greedy / temperature / top-k / top-p), diffusion samplers, CFG."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from config import DiffusionConfig
from model.diffusion import make_scheduler

SamplerKind = Literal["ddpm", "ddim"]


def sample_tokens(
    logits: torch.Tensor, generators: list[torch.Generator], temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None,
) -> list[int]:
    """logits [R, V] (banned ids already -inf) -> one id per row; row r draws from generators[r].

    temperature 0 is greedy (argmax); otherwise transformers' warpers filter, then a multinomial draw.
    """
    if temperature == 0:
        return logits.argmax(-1).tolist()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    no_ids = torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    probs = warpers(no_ids, logits.float()).softmax(-1)  # [R, V]
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]


def make_sampler(
    cfg: DiffusionConfig, kind: SamplerKind = "ddpm", steps: int = 250, spacing: str = "leading",
) -> SchedulerMixin:
    """A diffusers DDPM or DDIM scheduler on the training beta schedule, set to `steps` steps.

    `leading` (diffusers default) starts at T - T/steps; `trailing` at T - 1, where the cosine
    schedule has abar ~ 2e-9 and the x0 estimate amplifies any error in eps by 1/sqrt(abar).
    """
    if not 1 <= steps <= cfg.num_timesteps:
        raise ValueError(f"diffusion steps must lie in [1, {cfg.num_timesteps}], got {steps}")
    base: DDPMScheduler = make_scheduler(cfg)
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {kind!r}; use 'ddpm' or 'ddim'")
    # from_config copies betas/prediction type/clip_sample from the training scheduler.
    sched = cls.from_config({k: v for k, v in base.config.items() if not k.startswith("_")}, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    return sched


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on next-token logits [R, V]: u + s * (c - u); the conditional logits alone
    without u (scale 1 gives exactly the conditional logits either way)."""
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def guided_noise(eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None, scale: float,
                 eps_image: torch.Tensor | None = None, image_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance: eps_u + s * (eps_c - eps_u); the conditional prediction alone without eps_u.

    With `eps_image` (the prompt's images without its text: editing), two scales as InstructPix2Pix
    trains for: eps_u + s_img * (eps_image - eps_u) + s * (eps_c - eps_image).
    """
    if eps_uncond is None:
        return eps_cond
    if eps_image is None:
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return eps_uncond + image_scale * (eps_image - eps_uncond) + scale * (eps_cond - eps_image)
