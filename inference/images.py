"""Pixels <-> latents with the VAE (diffusers AutoencoderKL), and PNG output (one file per image, grids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

from config import ModelConfig
from model.image_prep import BadImage, load_image, scale_latents, unscale_latents


class VAEError(ValueError):
    """A VAE folder that is missing or does not fit the model."""


def load_vae(path: str | Path, cfg: ModelConfig, device: str | torch.device = "cpu") -> Any:
    """AutoencoderKL from a save_pretrained folder, checked against the model's latent channels."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise VAEError(f"cannot load an AutoencoderKL from '{path}': {e}") from None
    if vae.config.latent_channels != cfg.latent_channels:
        raise VAEError(
            f"the VAE at '{path}' has {vae.config.latent_channels} latent channels but the model "
            f"takes {cfg.latent_channels}"
        )
    return vae.to(device).eval().requires_grad_(False)


def vae_resolution(vae: Any, cfg: ModelConfig) -> int:
    """Pixel side of the images the model's latents decode to."""
    return cfg.latent_size * 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [N, C, h, w] (as the model sees them) -> images [N, 3, H, W] in [0, 1]."""
    x = unscale_latents(latents.to(vae.device, vae.dtype), vae.config.scaling_factor, vae.config.shift_factor)
    return ((vae.decode(x).sample.float() + 1) / 2).clamp(0, 1).cpu()


class ImageFileError(ValueError):
    """A prompt image file that cannot be read or decoded."""


def preprocess_image_file(path: str | Path, resolution: int) -> torch.Tensor:
    """An image file -> [3, R, R] in [-1, 1], exactly as data preparation preprocesses training images
    (`model.image_prep.load_image`: EXIF orientation, alpha on white, bicubic short-side resize,
    center crop); any size is accepted."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageFileError(f"cannot read image '{path}': {e.strerror or e}") from None
    try:
        return load_image(data, resolution)[0]
    except BadImage as e:
        raise ImageFileError(f"cannot use image '{path}': {e}") from None


@torch.no_grad()
def encode_image_file(vae: Any, path: str | Path, cfg: ModelConfig) -> torch.Tensor:
    """An image file -> scaled posterior-mean latent [C, h, w], as data_prep.encode_latents stores it:
    (mean - shift_factor) * scaling_factor of the preprocessed image."""
    x = preprocess_image_file(path, vae_resolution(vae, cfg))[None]  # [1, 3, R, R]
    mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return scale_latents(mean, vae.config.scaling_factor, vae.config.shift_factor)[0].cpu()


def save_pngs(images: torch.Tensor, paths: list[Path]) -> list[Path]:
    """images [N, 3, H, W] in [0, 1] -> one PNG each."""
    for img, p in zip(images, paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        save_image(img, p)
    return paths


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """images [N, 3, H, W] in [0, 1] -> one grid PNG (nrow images per row, ~square by default)."""
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), path)
    return path
