"""Train a small diffusers AutoencoderKL on an image set and save it with save_pretrained.

Offline we have no pretrained VAE, so the pipeline trains its own (as the paper does, at a far
smaller scale). Loss: MSE (+ optional L1) reconstruction of a posterior sample + a small KL term
(per pixel). After training, `scaling_factor` = 1 / std of posterior samples on up to
`--scale-samples` images (optionally `shift_factor` = their mean) is written into the saved config,
so the latents the transformer sees have unit variance.

Images come from any input encode_latents reads (manifest, tar, parquet, folder); captions are
ignored and bad images skipped. Options may also come from `--config vae.yaml`.

    python -m data_prep.train_vae --input data/train/manifest.jsonl --out vae/ \\
        --resolution 32 --block-out-channels 16,32,64 --latent-channels 4 --steps 600
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
import math
from typing import Any, Sequence

import torch

from .autoencoder_training import load_images  # noqa: F401 - re-exported: its home before autoencoder_training
from .autoencoder_training import (Recipe, autoencoder_kwargs, build_trainer_parser, reconstruction_metrics,
                                   train_autoencoder)
from .cli import int_list, parse_with_config, run_tool, setup_logging

log = logging.getLogger("data_prep.train_vae")


def build_vae(resolution: int, block_out_channels: Sequence[int], latent_channels: int,
              layers_per_block: int = 1, norm_num_groups: int | None = None, mid_attention: bool = True):
    """A fresh AutoencoderKL with 2**(len(block_out_channels)-1) downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**autoencoder_kwargs(resolution, block_out_channels, layers_per_block, norm_num_groups,
                                              mid_attention), latent_channels=latent_channels)


@torch.no_grad()
def latent_statistics(vae, data: torch.Tensor, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over all elements of posterior samples of `data` [N, 3, R, R]."""
    g = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(data), batch_size):
        z = vae.encode(data[i:i + batch_size]).latent_dist.sample(generator=g).double()  # [b, C, h, w]
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 1e-12))


@torch.no_grad()
def evaluate(vae, data: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Reconstruction MSE and PSNR (on [0, 1] pixels) from posterior means."""
    vae.eval()
    return reconstruction_metrics(lambda x: vae.decode(vae.encode(x).latent_dist.mean).sample, data, batch_size)


class VAERecipe(Recipe):
    """AutoencoderKL: posterior-sample reconstruction + per-pixel KL; scaling factor from the trained latents."""

    name, report_file, term_format = "VAE", "train_vae_report.json", "kl/pix %.3f"

    def build(self) -> Any:
        """A fresh AutoencoderKL for the options."""
        a = self.args
        blocks = int_list(a.block_out_channels)
        self.side = a.resolution // 2 ** (len(blocks) - 1)
        return build_vae(a.resolution, blocks, a.latent_channels, a.layers_per_block, a.norm_num_groups,
                         not a.no_mid_attention)

    def output_shape(self) -> str:
        """Latent shape as HxWxC."""
        return f"{self.side}x{self.side}x{self.args.latent_channels}"

    def loss_terms(self, model: Any, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Decoded posterior sample; the weighted KL per pixel."""
        post = model.encode(x).latent_dist  # mean/std [b, C, h, w]
        rec = model.decode(post.sample(generator=g)).sample  # [b, 3, R, R]
        kl = post.kl().mean() / (3 * self.args.resolution ** 2)  # KL per pixel
        return rec, self.args.kl_weight * kl, kl

    def finish(self, model: Any, train_set: torch.Tensor, val: torch.Tensor,
               n_val: int) -> tuple[dict[str, Any], str, tuple]:
        """Store scaling (and shift) factor in the config; validation metrics."""
        a = self.args
        sample = train_set[: a.scale_samples]
        mean, std = latent_statistics(model, sample, a.batch_size, a.seed)
        shift = mean if a.compute_shift else None
        scale = 1.0 / std
        model.register_to_config(scaling_factor=scale, shift_factor=shift)
        metrics = evaluate(model, val if n_val else sample, a.batch_size)
        entries = {"scaling_factor": scale, "shift_factor": shift,
                   "latent_shape": [a.latent_channels, self.side, self.side],
                   "val_mse": metrics["mse"], "val_psnr_db": metrics["psnr"]}
        return entries, "scaling_factor %.4f, val PSNR %.2f dB", (scale, metrics["psnr"])


def train(args: argparse.Namespace) -> dict:
    """Load data, train, compute the scaling factor, save; returns a summary dict."""
    return train_autoencoder(args, VAERecipe(args), log)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    return build_trainer_parser(__doc__, {
        "--block-out-channels": [("--latent-channels", dict(type=int, default=4))],
        "--batch-size": [("--kl-weight", dict(type=float, default=1e-4, help="weight of the per-pixel KL"))],
        "--max-seconds": [("--scale-samples", dict(type=int, default=512, help="images used for the scaling factor")),
                          ("--compute-shift", dict(action="store_true", help="also store shift_factor = latent mean"))],
    })


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the training summary (also saved as train_vae_report.json)."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    return train(args)


def cli() -> None:
    """Console entry point (`transfusion-train-vae`): errors a user must fix print as one line."""
    run_tool(main, "train_vae")


if __name__ == "__main__":
    cli()
