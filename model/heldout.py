"""Held-out evaluation's contract: packed rows with fixed noise and timesteps, and the sums one
forward pass yields (docs/architecture.md §6.5).

Every held-out image k (numbered over the whole evaluation set) gets the same noise and timestep at
every evaluation, drawn on CPU from a generator seeded by (eval seed, k): the numbers depend on the
weights only, not on the training step, the layout, the data-parallel size or the device. Timesteps
are stratified: image k falls in bucket k mod K of K equal ranges of [0, T) and takes a fixed draw
inside it, so each bucket's mean is an estimate at that noise level and their mean one of the
uniform-timestep training loss. A condition image (an edit's source) is read clean at t = 0 and
scored nowhere, as in training: its timestep is CONDITION_T (-1) here. The LM loss is split by what
a target is: plain text (documents without an image), captions (the text of image documents) and,
for VQ-token images, image codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import IGNORE_INDEX, PackedBatch
from .diffusion import NoiseSchedule
from .losses import LM_CHUNK_ROWS, LmLossSum, per_image_mse
from .transfusion import ModelOutput

TARGET_KINDS = ("text", "caption", "image_tokens")
CONDITION_T = -1  # a held-out condition image's timestep: the model reads it clean at t = 0, no loss


@dataclass
class HeldoutBatch:
    """One held-out micro-batch: the packed rows and what the evaluation fixes for them."""

    batch: PackedBatch
    targets: torch.Tensor  # [len(TARGET_KINDS), B, S] int64: text targets of each kind, IGNORE_INDEX elsewhere
    timesteps: torch.Tensor  # [N_img] int64; CONDITION_T for condition images
    noise: torch.Tensor  # [N_img, C, h, w]

    def to(self, device: torch.device | str) -> "HeldoutBatch":
        return HeldoutBatch(self.batch.to(device), *(t.to(device) for t in (self.targets, self.timesteps, self.noise)))

    @property
    def model_timesteps(self) -> torch.Tensor:
        """The timesteps the model reads [N_img]: condition images at 0."""
        return self.timesteps.clamp(min=0)

    def noisy_latents(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The images noised to their fixed timesteps [N_img, C, h, w]; condition images clean."""
        noisy = schedule.q_sample(self.batch.latents, self.model_timesteps, self.noise)
        return torch.where((self.timesteps == CONDITION_T)[:, None, None, None], self.batch.latents, noisy)


def target_kinds(batch: PackedBatch, boi: int, image_token_offset: int | None = None) -> torch.Tensor:
    """The batch's text targets split by kind [len(TARGET_KINDS), B, S] (see the module docstring).

    A document is a run of positions sharing kv_lo (its span start); it is an image document if it
    holds a BOI token (latent or VQ-token images). With VQ-token images (`image_token_offset` set)
    the targets at or above the offset are image codes.
    """
    lo = batch.kv_lo.long()
    doc = torch.cat([torch.zeros_like(lo[:, :1]), (lo[:, 1:] != lo[:, :-1]).long()], 1).cumsum(1)  # [B, S]
    has_boi = (batch.tokens == boi).long()
    doc_image = torch.zeros_like(doc).scatter_reduce(1, doc, has_boi, "amax").gather(1, doc).bool()
    t = batch.text_targets
    is_code = t >= image_token_offset if image_token_offset is not None else torch.zeros_like(doc_image)
    kinds = [~doc_image, doc_image & ~is_code, doc_image & is_code]
    return torch.stack([torch.where(k & (t != IGNORE_INDEX), t, IGNORE_INDEX) for k in kinds])


def bucket_range(b: int, n_buckets: int, num_timesteps: int) -> tuple[int, int]:
    """Timesteps [lo, hi) of bucket b: those t with t * n_buckets // num_timesteps == b."""
    return -(-b * num_timesteps // n_buckets), -(-(b + 1) * num_timesteps // n_buckets)


def fixed_draws(latent_shape: tuple[int, ...], first: int, count: int, seed: int, num_timesteps: int,
                n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [count], noise [count, *latent_shape]) of held-out images first .. first + count - 1."""
    ts, noise = [], []
    for k in range(first, first + count):
        gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + k) % 2**63)
        lo, hi = bucket_range(k % n_buckets, n_buckets, num_timesteps)
        ts.append(lo + int(torch.randint(hi - lo, (), generator=gen)))
        noise.append(torch.randn(latent_shape, generator=gen))
    return torch.tensor(ts, dtype=torch.int64), torch.stack(noise) if noise else torch.zeros(0, *latent_shape)


class HeldoutStats:
    """The sums of one held-out forward, as a vector [2 * len(TARGET_KINDS) + 2 * n_buckets] (float64):
    summed cross-entropy and target count per kind, summed epsilon MSE and image count per bucket.
    Sums (not means) so that micro-batches and ranks reduce by addition."""

    def __init__(self, num_timesteps: int, n_buckets: int, lm: bool = True, diffusion: bool = True) -> None:
        self.num_timesteps, self.n_buckets, self.lm, self.diffusion = num_timesteps, n_buckets, lm, diffusion
        self.size = 2 * len(TARGET_KINDS) + 2 * n_buckets

    def __call__(self, out: ModelOutput, targets: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 lm_loss: LmLossSum) -> torch.Tensor:
        """Sums of one micro-batch; `lm_loss` is the layout's LM sum (model/losses.py, parallel/)."""
        k = len(TARGET_KINDS)
        sums = torch.zeros(self.size, dtype=torch.float64, device=out.hidden.device)
        if self.lm:
            for i in range(k):
                sums[i] = lm_loss(out, targets[i], LM_CHUNK_ROWS).double()
                sums[k + i] = (targets[i] != IGNORE_INDEX).sum()
        if self.diffusion and noise.shape[0] > 0:
            scored = timesteps != CONDITION_T  # [N_img]
            bucket = timesteps.clamp(min=0) * self.n_buckets // self.num_timesteps  # [N_img]
            mse = per_image_mse(out.noise_pred, noise).double() * scored
            sums[2 * k:2 * k + self.n_buckets].index_add_(0, bucket, mse)
            sums[2 * k + self.n_buckets:].index_add_(0, bucket, scored.double())
        return sums

    def split(self, sums: torch.Tensor) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
        """(per kind (ce sum, targets), per bucket (mse sum, images)) of a summed vector."""
        k, n, v = len(TARGET_KINDS), self.n_buckets, sums.tolist()
        return ([(v[i], int(v[k + i])) for i in range(k)],
                [(v[2 * k + b], int(v[2 * k + n + b])) for b in range(n)])
