"""The VQ image tokenizer (diffusers VQModel) shared by data preparation and inference.

The discrete-image baseline (`model.image_representation: tokens`) turns an image into a grid of
codebook indices; the transformer sees `image_token_offset + code` as ordinary vocabulary ids.
Pixels are [-1, 1] (as `model.image_prep.load_image` returns them); the code grid side is the
image side divided by 2 ** (len(block_out_channels) - 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class VQError(ValueError):
    """A VQ model folder that is missing or does not fit the transformer's config."""


def load_vq(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A VQModel from a save_pretrained folder, frozen in eval mode (VQError when it cannot be read)."""
    from diffusers import VQModel

    try:
        vq = VQModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise VQError(f"cannot load a VQModel from '{path}': {e}; train one with `python -m data_prep.train_vq`") from None
    return vq.to(device).eval().requires_grad_(False)


def downsample(vq: Any) -> int:
    """Pixel side of one code."""
    return 2 ** (len(vq.config.block_out_channels) - 1)


def codebook_size(vq: Any) -> int:
    return int(vq.config.num_vq_embeddings)


def embed_dim(vq: Any) -> int:
    return int(vq.config.vq_embed_dim or vq.config.latent_channels)


def check_vq(vq: Any, grid: int, codes: int, where: str) -> None:
    """Refuse (VQError) a VQ model whose codebook or code grid differs from the model config's."""
    if codebook_size(vq) != codes:
        raise VQError(f"the VQ model at '{where}' has {codebook_size(vq)} codes but model.image_codebook_size={codes}")
    side = int(vq.config.sample_size) // downsample(vq)
    if side != grid:
        raise VQError(f"the VQ model at '{where}' makes {side}x{side} codes per image but model.latent_size={grid}")


def encode_codes(vq: Any, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [N, 3, R, R] in [-1, 1] -> code indices [N, R/f, R/f] int64 (nearest codebook entry)."""
    h = vq.encode(pixels.to(vq.device, vq.dtype)).latents  # [N, D, h, w] after quant_conv
    _, _, (_, _, idx) = vq.quantize(h)
    return idx.reshape(h.shape[0], h.shape[2], h.shape[3]).long()


def decode_codes(vq: Any, codes: torch.Tensor) -> torch.Tensor:
    """code indices [N, h, w] -> pixels [N, 3, R, R] in [-1, 1] (not clamped)."""
    n, h, w = codes.shape
    z = vq.quantize.get_codebook_entry(codes.reshape(-1).to(vq.device), (n, h, w, embed_dim(vq)))
    return vq.decode(z, force_not_quantize=True).sample
