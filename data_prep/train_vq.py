"""Train a small diffusers VQModel (the discrete-image baseline's tokenizer) and save_pretrained it.

The discrete-token baseline (`model.image_representation: tokens`, Chameleon-style) needs an image
tokenizer trained on the same images as the VAE. Loss: MSE (+ optional L1) reconstruction + the
quantizer's codebook and commitment terms (VQModel's `commit_loss`). The codebook starts on encoder
outputs of real images, and codes unused over `--restart-every` steps are re-seeded from encoder
outputs of the current batch, so a small codebook does not collapse onto a few entries. Inputs are
those of train_vae / encode_latents (manifest, tar, parquet, folder); captions are ignored, bad
images skipped and counted.

    python -m data_prep.train_vq --input data/train/manifest.jsonl --out vq/ \\
        --resolution 32 --block-out-channels 16,32,64 --embed-dim 4 --codebook-size 256 --steps 600
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
import math
from typing import Any, Sequence

import torch

from model.vq import decode_codes, downsample, encode_codes

from .autoencoder_training import (Recipe, autoencoder_kwargs, build_trainer_parser, reconstruction_metrics,
                                   train_autoencoder)
from .cli import int_list, parse_with_config, run_tool, setup_logging

log = logging.getLogger("data_prep.train_vq")


def build_vq(resolution: int, block_out_channels: Sequence[int], embed_dim: int, codebook_size: int,
             layers_per_block: int = 1, norm_num_groups: int | None = None, mid_attention: bool = True) -> Any:
    """A fresh diffusers VQModel with 2**(len(block_out_channels)-1) downsampling."""
    from diffusers import VQModel

    return VQModel(**autoencoder_kwargs(resolution, block_out_channels, layers_per_block, norm_num_groups,
                                        mid_attention),
                   latent_channels=embed_dim, vq_embed_dim=embed_dim, num_vq_embeddings=codebook_size)


@torch.no_grad()
def evaluate(vq: Any, data: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Reconstruction MSE / PSNR (on [0, 1] pixels) through the codes, and codebook usage."""
    vq.eval()
    counts = torch.zeros(vq.config.num_vq_embeddings)

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        codes = encode_codes(vq, x)
        counts.add_(torch.bincount(codes.flatten().cpu(), minlength=len(counts)).float())
        return decode_codes(vq, codes)

    metrics = reconstruction_metrics(reconstruct, data, batch_size)
    p = counts / counts.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {**metrics, "codes_used": int((counts > 0).sum()), "perplexity": perplexity}


def restart_dead_codes(vq: Any, used: torch.Tensor, h: torch.Tensor, g: torch.Generator) -> int:
    """Re-seed the codebook rows not in `used` with random encoder vectors of `h` [b, D, h, w]."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(len(pool), (len(dead),), generator=g)
    with torch.no_grad():
        vq.quantize.embedding.weight[dead] = pool[pick].to(vq.quantize.embedding.weight.dtype)
    return len(dead)


class VQRecipe(Recipe):
    """VQModel: reconstruction through the quantizer + its codebook/commitment loss; dead codes re-seeded."""

    name, report_file, term_format = "VQ", "train_vq_report.json", "vq %.4f"

    def build(self) -> Any:
        """A fresh VQModel for the options (ValueError when the resolution does not fit its downsampling)."""
        a = self.args
        vq = build_vq(a.resolution, int_list(a.block_out_channels), a.embed_dim, a.codebook_size,
                      a.layers_per_block, a.norm_num_groups, not a.no_mid_attention)
        f = downsample(vq)
        if a.resolution % f:
            raise ValueError(f"--resolution {a.resolution} is not a multiple of the downsampling factor {f}")
        self.side = a.resolution // f
        return vq

    def output_shape(self) -> str:
        """Code grid and codebook size."""
        return f"{self.side}x{self.side} codes of {self.args.codebook_size}"

    def start(self, model: Any, train_set: torch.Tensor, g: torch.Generator) -> None:
        """Data-dependent init: codes start on encoder outputs, not far from all of them."""
        self.used = torch.zeros(self.args.codebook_size, dtype=torch.bool)
        self.restarted = 0
        with torch.no_grad():
            restart_dead_codes(model, self.used, model.encode(train_set[:512]).latents, g)

    def loss_terms(self, model: Any, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Decoded quantized latents; the quantizer's codebook + commitment loss."""
        self.h = model.encode(x).latents  # [b, D, h, w]
        quant, commit, (_, _, idx) = model.quantize(self.h)
        self.used[idx.flatten()] = True
        rec = model.decode(quant, force_not_quantize=True).sample
        return rec, commit.mean(), commit.mean()

    def after_step(self, model: Any, step: int, g: torch.Generator) -> None:
        """Every --restart-every steps (in the first 80%), re-seed the codes unused since the last time."""
        a = self.args
        if a.restart_every and step % a.restart_every == 0 and step <= a.steps * 0.8:
            self.restarted += restart_dead_codes(model, self.used, self.h, g)
            self.used[:] = False

    def finish(self, model: Any, train_set: torch.Tensor, val: torch.Tensor,
               n_val: int) -> tuple[dict[str, Any], str, tuple]:
        """Validation metrics and codebook usage."""
        a, side = self.args, self.side
        metrics = evaluate(model, val if n_val else train_set[:256], a.batch_size)
        entries = {"codebook_size": a.codebook_size, "code_grid": [side, side], "codes_restarted": self.restarted,
                   "val_mse": metrics["mse"], "val_psnr_db": metrics["psnr"], "val_codes_used": metrics["codes_used"],
                   "val_code_perplexity": metrics["perplexity"]}
        return entries, "%dx%d codes, val PSNR %.2f dB, %d/%d codes used", (
            side, side, metrics["psnr"], metrics["codes_used"], a.codebook_size)


def train(args: argparse.Namespace) -> dict:
    """Load data, train, save; returns a summary dict (also written as train_vq_report.json)."""
    return train_autoencoder(args, VQRecipe(args), log)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    return build_trainer_parser(__doc__, {
        "--block-out-channels": [
            ("--embed-dim", dict(type=int, default=4, help="codebook vector size (small dims keep codes in use)")),
            ("--codebook-size", dict(type=int, default=256))],
        "--l1-weight": [("--restart-every", dict(type=int, default=25,
                                                 help="re-seed codes unused for this many steps (0: never)"))],
    })


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the training summary (also saved as train_vq_report.json)."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    return train(args)


def cli() -> None:
    """Console entry point: errors a user must fix print as one line."""
    run_tool(main, "train_vq")


if __name__ == "__main__":
    cli()
