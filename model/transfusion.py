"""The Transfusion network: one decoder over text tokens and noisy image patches.

Text positions are embedded from the vocabulary and read out by the LM head; image positions take
the patch encoder's vectors and are read out by the patch decoder as predicted noise. Plain
single-device PyTorch: parallelism is applied from outside (parallel/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import TransformerBlock, rope_frequencies
from .patch_codecs import Skips, build_patch_codecs


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    noise_pred: torch.Tensor  # [N_img, C, h, w]


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patch_encoder, self.patch_decoder = build_patch_codecs(cfg)
        # A ModuleDict keyed by layer index keeps names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; also used after materialising a meta-device model."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual projections, GPT-2 style
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Linear) and not name.startswith("patch_"):
                residual = name.endswith(("attention.wo", "feed_forward.w2"))
                nn.init.normal_(module.weight, std=out_std if residual else std)
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()  # norms, convs and linears of the patch codecs

    def embed(
        self, tokens: torch.Tensor, is_image: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, Skips]:
        """Token embeddings with image positions replaced by patch vectors: [B, S, d_model]."""
        h = self.tok_embeddings(tokens)  # [B, S, d]
        if noisy_latents.shape[0] == 0:
            return h, []
        patches, skips = self.patch_encoder(noisy_latents, timesteps)  # [N_img, P, d]
        # Images appear in row-major order, as do the True positions of is_image.
        return h.masked_scatter(is_image[..., None], patches.to(h.dtype)), skips

    def decode(
        self, h: torch.Tensor, is_image: torch.Tensor, timesteps: torch.Tensor, skips: Skips,
        num_images: int,
    ) -> ModelOutput:
        """Final norm, LM logits for every position and noise predictions for the images."""
        h = self.norm(h)
        logits = self.output(h)  # [B, S, V]
        if num_images == 0:
            size = self.cfg.latent_size
            empty = h.new_zeros(0, self.cfg.latent_channels, size, size)
            return ModelOutput(logits, empty)
        patches = h[is_image].view(num_images, -1, h.shape[-1])  # [N_img, P, d]
        return ModelOutput(logits, self.patch_decoder(patches, timesteps, skips))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor,  # [B, S]
        kv_lo: torch.Tensor,  # [B, S]
        kv_hi: torch.Tensor,  # [B, S]
        is_image: torch.Tensor,  # [B, S]
        noisy_latents: torch.Tensor,  # [N_img, C, h, w]
        timesteps: torch.Tensor,  # [N_img]
    ) -> ModelOutput:
        h, skips = self.embed(tokens, is_image, noisy_latents, timesteps)
        inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, device=h.device)
        for layer in self.layers.values():
            h = layer(h, position_ids, inv_freq, kv_lo, kv_hi)
        return self.decode(h, is_image, timesteps, skips, noisy_latents.shape[0])

    def num_params(self, exclude: tuple[str, ...] = ()) -> int:
        """Parameter count (works on the meta device), optionally excluding name prefixes."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(exclude))
