"""Encode image-caption pairs into MDS shards of VQ code indices + caption token ids.

The discrete-image baseline's counterpart of `data_prep.encode_latents`: same inputs (`--input`:
JSONL/CSV manifests, WebDataset tars, Parquet, folders with `.txt` captions; the same readers), the
same preprocessing (`model.image_prep`: EXIF orientation, RGB on white, short-side resize, center
crop, [-1, 1]), the same skip accounting and the same partitioned, resumable chunk writing
(`data_prep.sharding.ShardJob`). Each image is encoded with a `VQModel` (`data_prep.train_vq`) into
its grid of nearest-codebook indices, stored row-major as `image_tokens` (int32, 0 ..
codebook_size-1; columns: `data_prep.schema.IMAGE_TOKEN_COLUMNS`). The trainer reads them with a
stream of `kind: image_tokens` and adds `model.image_token_offset`.

    python -m data_prep.encode_vq_tokens --input data/manifest.jsonl --out shards/img_tokens \\
        --vq vq/ --tokenizer tok/tokenizer.model --resolution 32 [--rank R --world-size W]

With several workers, run `python -m data_prep.merge_index OUT` afterwards (one worker merges itself).
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
from typing import Any, Sequence

import numpy as np
import torch

from model.vq import codebook_size, downsample, encode_codes, load_vq

from .cli import local_abspath, parse_with_config, run_tool
from .image_encoding import (CheckedImage, EncoderSetup, ImageChunkEncoder, build_encoder_parser, encode_images,
                             grid_side, pad_batch, resolve_device)
from .schema import IMAGE_TOKEN_COLUMNS

log = logging.getLogger("data_prep.encode_vq_tokens")


class CodeEncoder:
    """A frozen VQModel mapping fixed-size image batches to code grids."""

    def __init__(self, vq_path: str, batch_size: int = 32, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.vq = load_vq(vq_path, self.device)
        self.batch_size = batch_size
        self.codebook_size = codebook_size(self.vq)
        self.downsample = downsample(self.vq)

    def grid(self, resolution: int) -> int:
        """Code grid side for square images of `resolution` pixels."""
        return grid_side(resolution, self.downsample, "the VQ model")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, 3, R, R] in [-1, 1] -> codes [n, R/f, R/f] int64 on the CPU (batch padded to a fixed size)."""
        n = x.shape[0]
        return encode_codes(self.vq, pad_batch(x, self.batch_size))[:n].cpu()


class TokenChunkEncoder(ImageChunkEncoder):
    """The chunk processor writing each image's code grid, row-major, as `image_tokens`."""

    def encode_batch(self, batch: list[CheckedImage]) -> list[dict[str, Any] | str]:
        """Code columns per image (every image gets its codes)."""
        codes = self.encoder(torch.stack([g.pixels for g in batch]))  # [n, h, w]
        return [{"image_tokens": codes[i].flatten().numpy().astype(np.int32)} for i in range(len(batch))]


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    def model_args(io: argparse._ArgumentGroup) -> None:
        io.add_argument("--vq", required=True, help="VQModel folder written by save_pretrained (data_prep.train_vq)")

    return build_encoder_parser(__doc__, model_args, "VQ batch, fixed; default 32 on CUDA, 4 on CPU",
                                "records per resumable chunk (one MDS sub-folder)", "MDS compression, e.g. zstd")


def load_encoder(args: argparse.Namespace) -> EncoderSetup:
    """The VQ model of `args` with what the shared driver needs to write its codes."""
    encoder = CodeEncoder(args.vq, args.batch_size, args.device)
    side = encoder.grid(args.resolution)
    settings = {"vq": local_abspath(args.vq), "codebook_size": encoder.codebook_size, "token_grid": [side, side]}
    return EncoderSetup(
        settings, dict(IMAGE_TOKEN_COLUMNS), f"{side}x{side} codes of {encoder.codebook_size}; VQ on {encoder.device}",
        encoder.device,
        lambda tokenizer, min_size: TokenChunkEncoder(encoder, tokenizer, args.resolution, min_size, args.decode_workers))


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns this worker's report."""
    return encode_images(parse_with_config(build_parser(), argv), log, "image_tokens", load_encoder)


def cli() -> None:
    """Console entry point: errors a user must fix print as one line."""
    run_tool(main, "encode_vq_tokens")


if __name__ == "__main__":
    cli()
