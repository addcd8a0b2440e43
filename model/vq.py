"""The VQ image tokenizer (diffusers VQModel) shared by data preparation and inference.

The discrete-image baseline (`model.image_representation: tokens`) turns an image into a grid of
codebook indices; the transformer sees `image_token_offset + code` as ordinary vocabulary ids.
Pixels are [-1, 1] (as `model.image_prep.load_image` returns them); the code grid side is the
image side divided by 2 ** (len(block_out_channels) - 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


class VQError(ValueError):
    """A VQ model folder that is missing or does not fit the transformer's config."""


def build_vq(resolution: int, block_out_channels: Sequence[int], embed_dim: int, codebook_size: int,
             layers_per_block: int = 1, norm_num_groups: int | None = None, mid_attention: bool = True) -> Any:
    """A fresh diffusers VQModel with 2**(len(block_out_channels)-1) downsampling."""
    from diffusers import VQModel

    if norm_num_groups is None:  # largest group count that divides every width
        norm_num_groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in block_out_channels))
    n = len(block_out_channels)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=embed_dim, vq_embed_dim=embed_dim,
        num_vq_embeddings=codebook_size, norm_num_groups=norm_num_groups, sample_size=resolution,
        mid_block_add_attention=mid_attention)


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
