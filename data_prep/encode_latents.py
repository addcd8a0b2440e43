"""Encode image-caption pairs into MDS shards of VAE latent distributions + caption token ids.

Inputs (`--input`, auto-detected or `--format`): a JSONL/CSV manifest (path, caption; paths relative
to the manifest), WebDataset-style `.tar` shards (image + `.txt`/`.json` caption per key), Parquet
(image bytes + caption columns), or a folder of images with sidecar `.txt` captions.

Each image is decoded to RGB (alpha on white), resized on its short side and center-cropped to
`--resolution`, scaled to [-1, 1], and encoded in batches with `AutoencoderKL.from_pretrained`
(eval mode, bf16 autocast on CUDA, fp32 on CPU). The posterior mean and std are stored after the
VAE's scaling (and shift) factors; see `data_prep.schema` for the columns. Captions are tokenized
without BOS/EOS. Batches are always padded to `--batch-size`, which makes every latent independent
of which other images share its batch: 1 worker, N workers and resumed runs give identical bits.

Bad inputs are skipped and counted per reason in the report, with up to 5 examples per reason and
chunk (keys with 1-based `file:line`/`file:row` locations): unreadable, corrupt or truncated
images, images smaller than `--min-size`, missing, empty or over-long (> 131,072 characters)
captions, captions that are not valid UTF-8 (`bad_utf8`) or cannot be tokenized, malformed
manifest lines or tar `.json` members (`bad_json`), and damaged containers: a tar cut short
(`truncated_tar`, named by file, after the samples before the damage), a parquet file without its
footer (`truncated_parquet`) or with an unreadable row group (`corrupt_parquet`, per row).
A key seen again in a worker's input is written as `key#1`, `key#2`, ... (see data_prep.readers).

    python -m data_prep.encode_latents --input data/manifest.jsonl --out shards/img \\
        --vae vae/ --tokenizer tok/tokenizer.model --resolution 256 [--rank R --world-size W]

With several workers, run `python -m data_prep.merge_index OUT` afterwards (one worker merges itself).
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
from typing import Any, Sequence

import numpy as np
import torch

from model.image_prep import scale_latents

from .cli import local_abspath, parse_with_config, run_tool
from .image_encoding import (CheckedImage, EncoderSetup, ImageChunkEncoder, build_encoder_parser, encode_images,
                             grid_side, pad_batch, resolve_device)
from .schema import image_columns, latents_to_storage, storage_to_tensor
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.encode_latents")
NONFINITE = "nonfinite_latent"


class LatentEncoder:
    """A frozen AutoencoderKL that maps image batches to scaled posterior (mean, std)."""

    def __init__(self, vae_path: str, batch_size: int = 32, device: str = "auto", subfolder: str | None = None):
        from diffusers import AutoencoderKL

        self.device = resolve_device(device)
        if self.device.type == "cuda":  # same algorithms every run, so a resumed job matches bit for bit
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        try:
            vae = AutoencoderKL.from_pretrained(vae_path, subfolder=subfolder, local_files_only=True,
                                                low_cpu_mem_usage=False)
        except (OSError, EnvironmentError) as e:
            raise FileNotFoundError(f"cannot load an AutoencoderKL from {vae_path}: {e}. Train one with "
                                    f"`python -m data_prep.train_vae` or point --vae at a save_pretrained folder") from e
        self.vae = vae.eval().requires_grad_(False).to(self.device)
        cfg = self.vae.config
        self.batch_size = batch_size
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = None if cfg.shift_factor is None else float(cfg.shift_factor)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        if getattr(cfg, "latents_mean", None) is not None:
            log.warning("%s sets per-channel latents_mean/latents_std; they are NOT applied (only "
                        "scaling_factor/shift_factor are)", vae_path)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of square images of `resolution` pixels."""
        side = grid_side(resolution, self.downsample, "the VAE")
        return (self.latent_channels, side, side)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, 3, R, R] in [-1, 1] -> scaled (mean, std), each fp32 [n, C, R/f, R/f] on the CPU."""
        n = x.shape[0]
        x = pad_batch(x, self.batch_size).to(self.device, non_blocking=True)  # fixed batch shape
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            dist = self.vae.encode(x).latent_dist  # parameters [B, 2C, h, w]
        mean, std = dist.mean[:n].float(), dist.std[:n].float()
        return scale_latents(mean, self.scaling_factor, self.shift_factor).cpu(), (std * self.scaling_factor).cpu()


class ChunkEncoder(ImageChunkEncoder):
    """The chunk processor writing each image's scaled posterior (mean, std) and original size."""

    def __init__(self, encoder: LatentEncoder, tokenizer: Tokenizer, resolution: int, min_size: int,
                 latent_dtype: str, decode_workers: int):
        super().__init__(encoder, tokenizer, resolution, min_size, decode_workers)
        self.latent_dtype = latent_dtype

    def encode_batch(self, batch: list[CheckedImage]) -> list[dict[str, Any] | str]:
        """Latent columns per image; images whose stored latents are not finite are skipped."""
        mean, std = self.encoder(torch.stack([g.pixels for g in batch]))  # [n, C, h, w] each
        mean_s = latents_to_storage(mean, self.latent_dtype)
        std_s = latents_to_storage(std, self.latent_dtype)
        finite = (storage_to_tensor(mean_s).isfinite().flatten(1).all(1)
                  & storage_to_tensor(std_s).isfinite().flatten(1).all(1))
        return [{"latent_mean": mean_s[i], "latent_std": std_s[i], "orig_size": np.asarray(g.orig, dtype=np.int32)}
                if finite[i] else NONFINITE  # e.g. fp16 overflow of a degenerate image
                for i, g in enumerate(batch)]


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    def model_args(io: argparse._ArgumentGroup) -> None:
        io.add_argument("--vae", required=True, help="AutoencoderKL folder written by save_pretrained")
        io.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a diffusers pipeline folder")

    def processing_args(pp: argparse._ArgumentGroup) -> None:
        pp.add_argument("--latent-dtype", default="float16", choices=["float16", "bfloat16"])

    return build_encoder_parser(
        __doc__, model_args, "VAE batch, fixed (part of the output's identity); default 32 on CUDA, 4 on CPU "
                             "(bigger CPU batches fall out of cache and run slower per image)",
        "records per resumable chunk (one MDS sub-folder; ~64 MB of 256px latents)",
        "MDS compression, e.g. zstd (latents compress poorly)", processing_args)


def vae_settings(args: argparse.Namespace, encoder: LatentEncoder) -> dict[str, Any]:
    """The VAE's entries of job.json (and so of dataset_info.json): what the latents depend on."""
    return {"vae": local_abspath(args.vae), "vae_subfolder": args.vae_subfolder,
            "scaling_factor": encoder.scaling_factor, "shift_factor": encoder.shift_factor,
            "latent_shape": list(encoder.latent_shape(args.resolution)), "latent_dtype": args.latent_dtype}


def load_encoder(args: argparse.Namespace) -> EncoderSetup:
    """The VAE of `args` with what the shared driver needs to write its latents."""
    encoder = LatentEncoder(args.vae, args.batch_size, args.device, args.vae_subfolder)
    latent_shape = encoder.latent_shape(args.resolution)
    settings = vae_settings(args, encoder)
    return EncoderSetup(
        settings, image_columns(latent_shape, args.latent_dtype),
        f"latents {latent_shape} {args.latent_dtype}; VAE on {encoder.device}", encoder.device,
        lambda tokenizer, min_size: ChunkEncoder(encoder, tokenizer, args.resolution, min_size, args.latent_dtype,
                                                 args.decode_workers))


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns this worker's report."""
    return encode_images(parse_with_config(build_parser(), argv), log, "image_caption", load_encoder)


def cli() -> None:
    """Console entry point (`transfusion-encode-latents`): errors a user must fix print as one line."""
    run_tool(main, "encode_latents")


if __name__ == "__main__":
    cli()
