"""DDPM noise schedule on VAE latents: cosine (or linear) betas, q_sample, training noise draws."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from config import DiffusionConfig

_BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The diffusers DDPM scheduler matching our training schedule (also used by the samplers)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_timesteps,
        beta_schedule=_BETA_SCHEDULES[cfg.schedule],
        prediction_type="epsilon",
        clip_sample=False,
    )


class NoiseSchedule:
    """Forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar from diffusers."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.num_timesteps = cfg.num_timesteps
        self.alphas_cumprod = make_scheduler(cfg).alphas_cumprod.to(torch.float64)  # [T]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean latents x0 [N, C, h, w] to timesteps t [N]."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(torch.float32)  # [N]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise

    def sample_training_inputs(
        self, x0: torch.Tensor, max_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw t ~ U{0..max_t-1} and eps ~ N(0, I) per image; return (x_t, t, eps). An image with
        max_t 0 is a condition: x_t is the clean latent and t is 0 (its eps is drawn all the same, so
        the other images' draws do not depend on the roles)."""
        u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64, device=x0.device)
        max_t = max_t.to(x0.device)
        t = (u * max_t.clamp(1, self.num_timesteps)).long()  # [N]; 0 for a condition
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = self.q_sample(x0, t, noise)
        condition = max_t == 0
        if bool(condition.any()):
            x_t = torch.where(condition.view((-1,) + (1,) * (x0.dim() - 1)), x0, x_t)
        return x_t, t, noise
