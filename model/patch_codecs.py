"""Image patch codecs: noisy VAE latents <-> transformer patch vectors, conditioned on the timestep.

`linear`: 2x2 (or p x p) patches through one linear layer, timestep embedding added to every patch.
`unet`: U-Net down blocks (ResNet blocks with scale-shift timestep conditioning, diffusers' building
blocks) to a p x p-downsampled grid of d_model vectors; the decoder mirrors them with skip
connections and predicts the noise epsilon.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from config import ModelConfig

Skips = list[torch.Tensor]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, (h/p)*(w/p), C*p*p], patches in row-major order."""
    N, C, h, w = x.shape
    x = x.reshape(N, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, h/p, w/p, C, p, p]
    return x.reshape(N, (h // p) * (w // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify`: [N, P, C*p*p] -> [N, C, h, w]."""
    N = x.shape[0]
    x = x.reshape(N, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5)  # [N, C, h/p, p, w/p, p]
    return x.reshape(N, C, h, w)


def gather_patches(h: torch.Tensor, is_image: torch.Tensor, num_images: int, P: int) -> torch.Tensor:
    """Hidden states of the image positions, h [B, S, d] -> [N_img, P, d] (row-major order)."""
    return h[is_image].view(num_images, P, h.shape[-1])


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features followed by an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.features = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(freq_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = self.features(t)  # [N, freq_dim] fp32
        return self.mlp(feats.to(self.mlp.linear_1.weight.dtype))  # [N, dim]


class LinearPatchEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Linear(cfg.latent_channels * self.p * self.p, cfg.d_model)
        self.time = TimeEmbedding(cfg.d_model)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        """x [N, C, h, w], t [N] -> patch vectors [N, P, d_model] (no skips)."""
        return self.proj(patchify(x, self.p)) + self.time(t)[:, None, :], []


class LinearPatchDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.p, self.C, self.size = cfg.patch_size, cfg.latent_channels, cfg.latent_size
        self.proj = nn.Linear(cfg.d_model, cfg.latent_channels * self.p * self.p)

    def forward(self, h: torch.Tensor, is_image: torch.Tensor, t: torch.Tensor, skips: Skips) -> torch.Tensor:
        """h [B, S, d_model] at is_image positions -> predicted noise [N_img, C, h, w]."""
        patches = gather_patches(h, is_image, t.shape[0], (self.size // self.p) ** 2)  # [N_img, P, d]
        return unpatchify(self.proj(patches), self.p, self.C, self.size, self.size)


def _resnet(cin: int, cout: int, temb: int, groups: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups,
        time_embedding_norm="scale_shift",
    )


class UNetPatchEncoder(nn.Module):
    """U-Net down path: one level per entry of unet_channels, downsampling by 2 between levels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, L, g = cfg.unet_channels, cfg.unet_layers_per_level, cfg.unet_groups
        temb = 4 * ch[0]
        self.time = TimeEmbedding(temb, freq_dim=ch[0])
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = ch[0]
        for i, c in enumerate(ch):
            self.levels.append(nn.ModuleList([_resnet(cin if r == 0 else c, c, temb, g) for r in range(L)]))
            cin = c
            if i < len(ch) - 1:
                self.downs.append(Downsample2D(c, use_conv=True, out_channels=c))
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.proj_out = nn.Linear(ch[-1], cfg.d_model)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        """x [N, C, h, w], t [N] -> patch vectors [N, P, d_model] and per-level skips."""
        temb = self.time(t)
        h = self.conv_in(x)
        skips: Skips = []
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h, temb)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = F.silu(self.norm_out(h))  # [N, c_last, h/p, w/p]
        return self.proj_out(h.flatten(2).transpose(1, 2)), skips  # [N, P, d_model]


class UNetPatchDecoder(nn.Module):
    """U-Net up path mirroring the encoder, consuming its skips; predicts epsilon."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, L, g = cfg.unet_channels, cfg.unet_layers_per_level, cfg.unet_groups
        temb = 4 * ch[0]
        self.grid = cfg.latent_size // cfg.patch_size
        self.time = TimeEmbedding(temb, freq_dim=ch[0])
        self.proj_in = nn.Linear(cfg.d_model, ch[-1])
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            c = ch[i]
            # The first block of a level takes the level's skip concatenated on channels.
            self.levels.append(nn.ModuleList([_resnet(cin + c if r == 0 else c, c, temb, g) for r in range(L)]))
            cin = c
            if i > 0:
                self.ups.append(Upsample2D(c, use_conv=True, out_channels=ch[i - 1]))
                cin = ch[i - 1]
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.latent_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, is_image: torch.Tensor, t: torch.Tensor, skips: Skips) -> torch.Tensor:
        """h [B, S, d_model] at is_image positions -> predicted noise [N_img, C, h, w]."""
        temb = self.time(t)
        patches = gather_patches(h, is_image, t.shape[0], self.grid**2)  # [N_img, P, d]
        x = self.proj_in(patches).transpose(1, 2).unflatten(2, (self.grid, self.grid))  # [N, c_last, g, g]
        for j, level in enumerate(self.levels):
            x = torch.cat([x, skips[len(skips) - 1 - j]], dim=1)
            for block in level:
                x = block(x, temb)
            if j < len(self.ups):
                x = self.ups[j](x)
        return self.conv_out(F.silu(self.norm_out(x)))


def build_patch_codecs(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) selected by cfg.patch_codec."""
    if cfg.patch_codec == "unet":
        return UNetPatchEncoder(cfg), UNetPatchDecoder(cfg)
    return LinearPatchEncoder(cfg), LinearPatchDecoder(cfg)
