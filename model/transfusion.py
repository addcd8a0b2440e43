"""The Transfusion network: one decoder over text tokens and noisy image patches.

Text positions are embedded from the vocabulary and read out by the LM head; image positions take
the patch encoder's vectors and are read out by the patch decoder as predicted noise. Plain
single-device PyTorch: parallelism is applied from outside (parallel/).

A pipeline stage (parallel/pipeline.py) is a copy of this model with the modules it does not hold
set to None (torchtitan-style), and the forward skips them: without the input modules it takes the
previous stage's hidden state instead of tokens, without the output modules it returns the
residual stream and the U-Net skips instead of a ModelOutput.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from config import ModelConfig
from .init import Place, copy_full, init_parameters
from .layers import KVCache, TransformerBlock, rope_frequencies
from .patch_codecs import Skips, build_patch_codecs


class ModelOutput:
    """What the network returns: final-normed hidden states, the LM head to read them with, and the
    predicted noise of the images.

    Logits are not computed in the forward: training reads the head at text-target positions only
    (model/losses.py, chunked), inference at the positions it samples from (`logits_at`,
    `last_logits`). `logits` (every position) is computed on first access, for callers that want
    them all.
    """

    def __init__(self, noise_pred: torch.Tensor, hidden: torch.Tensor, head: nn.Module) -> None:
        self.noise_pred = noise_pred  # [N_img, C, h, w]
        self.hidden = hidden  # [B, S, d_model] after the final norm
        self.head = head
        self._logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """[B, S, V] logits of every position (computed once, on first access)."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits

    def logits_at(self, mask: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] of the positions where mask [B, S] is True, in row-major order."""
        if self._logits is not None:
            return self._logits[mask]
        return self.head(self.hidden[mask])

    def last_logits(self) -> torch.Tensor:
        """Logits [B, V] of each row's last position (what autoregressive sampling reads)."""
        if self._logits is not None:
            return self._logits[:, -1]
        return self.head(self.hidden[:, -1:])[:, 0]


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        """The model with its initial weights for run seed `seed` (model/init.py: a function of the
        seed and each parameter's name); on the meta device nothing is drawn until `init_weights`."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patch_encoder, self.patch_decoder = build_patch_codecs(cfg)
        # A ModuleDict keyed by layer index keeps names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, place: Place = copy_full) -> None:
        """(Re)initialise every parameter this module holds (a pipeline stage: its own) for
        `self.seed`; `place` writes each full value into its parameter (parallel/: the local shard)."""
        init_parameters(self, self.cfg, self.seed, place)

    def embed(
        self, tokens: torch.Tensor, is_image: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, Skips]:
        """Token embeddings with image positions replaced by patch vectors: [B, S, d_model]."""
        h = self.tok_embeddings(tokens)  # [B, S, d]
        # The codecs run even on an empty image batch, so every rank of a sharded layout joins
        # their collectives and their parameters always receive a (zero) gradient.
        patches, skips = self.patch_encoder(noisy_latents, timesteps)  # [N_img, P, d]
        # Images appear in row-major order, as do the True positions of is_image.
        return h.masked_scatter(is_image[..., None], patches.to(h.dtype)), skips

    def decode(self, h: torch.Tensor, is_image: torch.Tensor, timesteps: torch.Tensor, skips: Skips) -> ModelOutput:
        """Final norm and noise predictions for the images; the LM head is applied by the reader
        of the output (the loss at text targets only, inference where it samples)."""
        h = self.norm(h)
        # The patch decoder reads the image positions of h itself, so that parallel plans can hand
        # it the whole (gathered) sequence.
        noise_pred = self.patch_decoder(h, is_image, timesteps, skips)
        return ModelOutput(noise_pred, h, self.output)

    @property
    def is_first(self) -> bool:
        """Holds the input modules (embeddings, patch encoder): the forward takes tokens."""
        return self.tok_embeddings is not None

    @property
    def is_last(self) -> bool:
        """Holds the output modules (final norm, LM head, patch decoder): the forward returns a ModelOutput."""
        return self.norm is not None

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S]; without the input modules: the hidden state h [B, S, d_model]
        position_ids: torch.Tensor,  # [B, S]
        kv_lo: torch.Tensor,  # [B, S]
        kv_hi: torch.Tensor,  # [B, S]
        is_image: torch.Tensor,  # [B, S]
        noisy_latents: torch.Tensor,  # [N_img, C, h, w]
        timesteps: torch.Tensor,  # [N_img]
        cache: KVCache | None = None,  # inference: keys of earlier positions (spans index cached + new)
        skips: Skips | None = None,  # without the input modules: the patch encoder's U-Net skips
    ) -> ModelOutput | tuple[torch.Tensor, Skips]:
        """ModelOutput of the whole model; a pipeline stage before the last returns (h [B, S, d], skips)."""
        if self.is_first:
            h, skips = self.embed(tokens, is_image, noisy_latents, timesteps)
        else:  # a later pipeline stage: the previous stage's residual stream and skips
            h, skips = tokens, skips or []
        inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, device=h.device)
        for name, layer in self.layers.items():
            h = layer(h, position_ids, inv_freq, kv_lo, kv_hi, None if cache is None else cache.layer(name))
        if not self.is_last:
            return h, skips
        return self.decode(h, is_image, timesteps, skips)

    def num_params(self, exclude: tuple[str, ...] = ()) -> int:
        """Parameter count (works on the meta device), optionally excluding name prefixes."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(exclude))
