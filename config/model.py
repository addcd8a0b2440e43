"""Model and diffusion configs of the Transfusion network (docs/architecture.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .base import require

AttentionBackend = Literal["auto", "triton", "flex", "flash", "sdpa"]


@dataclass
class SpecialTokens:
    """Ids of the special tokens inside the text vocabulary (sentencepiece ids 0-2 by default)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    boi: int = 3
    eoi: int = 4


@dataclass
class ModelConfig:
    """Llama-2-style decoder plus image patch codecs."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    ffn_dim: int | None = None  # None = Llama rule: 2/3 * 4 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    attention: AttentionBackend = "auto"
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    # Images: VAE latents [C, latent_size, latent_size] cut into patch_size x patch_size patches.
    latent_channels: int = 8
    latent_size: int = 32
    patch_size: int = 2
    patch_codec: Literal["linear", "unet"] = "linear"
    # Attention among one image's patches: every patch sees the whole image (the paper), or only
    # the patches before it, like text (the paper's Table 5 ablation). Only the spans change.
    image_attention: Literal["bidirectional", "causal"] = "bidirectional"
    # How an image enters the sequence: VAE latent patches trained with diffusion (the paper), or
    # discrete VQ codes trained with the LM loss only (the Chameleon-style baseline). With `tokens`,
    # an image is BOI, image_token_offset + code_k for the latent_size x latent_size code grid, EOI;
    # the codes are ordinary vocabulary ids above the text vocabulary (vocab_size covers both).
    image_representation: Literal["latent", "tokens"] = "latent"
    image_token_offset: int = 0  # tokens only: vocabulary id of code 0 (the text vocabulary size)
    image_codebook_size: int = 0  # tokens only: codes in the VQ codebook
    # U-Net codec: channels per resolution level, from the finest; the codec downsamples by 2
    # between levels, so the patch side equals 2 ** (len(unet_channels) - 1).
    unet_channels: list[int] = field(default_factory=lambda: [512, 1024])
    unet_layers_per_level: int = 2
    unet_groups: int = 32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.d_model / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def patches_per_image(self) -> int:
        """Positions between BOI and EOI: latent patches, or (tokens) one VQ code per grid cell."""
        if self.image_representation == "tokens":
            return self.latent_size ** 2
        return (self.latent_size // self.patch_size) ** 2

    @property
    def image_token_range(self) -> tuple[int, int]:
        """[first, end) vocabulary ids of the image codes (tokens representation)."""
        return self.image_token_offset, self.image_token_offset + self.image_codebook_size

    def validate(self) -> None:
        require(self.vocab_size > 0, f"model.vocab_size must be positive, got {self.vocab_size}")
        for name in ("d_model", "n_layers", "n_heads", "latent_channels", "latent_size", "patch_size"):
            require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        require(
            self.d_model % self.n_heads == 0,
            f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}",
        )
        require(
            self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
            f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}",
        )
        require(self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even for RoPE")
        require(
            self.latent_size % self.patch_size == 0,
            f"model.patch_size={self.patch_size} does not divide model.latent_size={self.latent_size}",
        )
        ids = vars(self.tokens)
        for name, value in ids.items():
            require(
                0 <= value < self.vocab_size,
                f"model.tokens.{name}={value} is outside the vocabulary [0, {self.vocab_size})",
            )
        require(len(set(ids.values())) == len(ids), f"model.tokens ids must be distinct, got {ids}")
        require(self.image_representation in ("latent", "tokens"),
                f"model.image_representation must be latent or tokens, got {self.image_representation!r}")
        if self.image_representation == "tokens":
            lo, hi = self.image_token_range
            require(self.image_codebook_size > 0, "model.image_representation=tokens needs model.image_codebook_size > 0 "
                    "(the VQ model's num_vq_embeddings)")
            require(lo > max(ids.values()), f"model.image_token_offset={lo} must lie above the special token ids "
                    f"(max {max(ids.values())}); set it to the text vocabulary size")
            require(hi <= self.vocab_size, f"model.image_token_offset={lo} + model.image_codebook_size="
                    f"{self.image_codebook_size} = {hi} exceeds model.vocab_size={self.vocab_size}; "
                    "vocab_size must cover text + codebook")
        if self.patch_codec == "unet":
            levels = len(self.unet_channels)
            require(levels >= 1, "model.unet_channels needs at least one level")
            require(
                2 ** (levels - 1) == self.patch_size,
                f"model.unet_channels has {levels} levels, so the U-Net patch side is "
                f"{2 ** (levels - 1)}, but model.patch_size={self.patch_size}",
            )
            for c in self.unet_channels:
                require(
                    c % self.unet_groups == 0,
                    f"model.unet_groups={self.unet_groups} does not divide U-Net channels {c}",
                )
        require(self.unet_layers_per_level >= 1, "model.unet_layers_per_level must be >= 1")


@dataclass
class DiffusionConfig:
    """DDPM on VAE latents: cosine schedule, epsilon prediction, loss weight lambda."""

    num_timesteps: int = 1000
    schedule: Literal["cosine", "linear"] = "cosine"
    loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_DDPM

    def validate(self) -> None:
        require(self.num_timesteps > 1, f"diffusion.num_timesteps must be > 1, got {self.num_timesteps}")
        require(self.loss_weight >= 0, f"diffusion.loss_weight must be >= 0, got {self.loss_weight}")
