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

if not __package__:  # run as a file (`python data_prep/encode_vq_tokens.py`): import it as part of the package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "data_prep"

import argparse
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from model.vq import codebook_size, downsample, encode_codes, load_vq

from . import readers
from .cli import local_abspath, parse_with_config, run_tool, setup_logging
from .encode_latents import ChunkEncoder, _Good
from .schema import IMAGE_TOKEN_COLUMNS
from .sharding import ShardJob, Stats, add_scaleout_args, merge_parts, partition, resolve_worker
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.encode_vq_tokens")


class CodeEncoder:
    """A frozen VQModel mapping fixed-size image batches to code grids."""

    def __init__(self, vq_path: str, batch_size: int = 32, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.vq = load_vq(vq_path, self.device)
        self.batch_size = batch_size
        self.codebook_size = codebook_size(self.vq)
        self.downsample = downsample(self.vq)

    def grid(self, resolution: int) -> int:
        """Code grid side for square images of `resolution` pixels."""
        if resolution % self.downsample:
            raise ValueError(f"--resolution {resolution} is not a multiple of the VQ model's downsampling "
                             f"factor {self.downsample}")
        return resolution // self.downsample

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, 3, R, R] in [-1, 1] -> codes [n, R/f, R/f] int64 on the CPU (batch padded to a fixed size)."""
        n = x.shape[0]
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
        return encode_codes(self.vq, x)[:n].cpu()


class TokenChunkEncoder(ChunkEncoder):
    """encode_latents' chunk processor (reading, caption checks, decoding, skips) writing code grids."""

    def _flush(self, batch: list[_Good], writer: Any, stats: Stats, tick: Callable[[int], None]) -> None:
        codes = self.encoder(torch.stack([g.pixels for g in batch]))  # [n, h, w]
        for i, g in enumerate(batch):
            writer.write({"key": g.key, "caption": g.caption, "caption_ids": np.asarray(g.ids, dtype=np.int32),
                          "image_tokens": codes[i].flatten().numpy().astype(np.int32)})
            stats.written += 1
            stats.renamed += g.renamed
        tick(len(batch))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of option: value defaults")
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--input", nargs="+", required=True, help="manifest(s), tar shards, parquet files, globs or a folder")
    io.add_argument("--format", default="auto", choices=["auto", "manifest", "tar", "parquet", "folder"])
    io.add_argument("--out", required=True, help="output folder (gets one part-<rank>/ sub-folder per worker)")
    io.add_argument("--vq", required=True, help="VQModel folder written by save_pretrained (data_prep.train_vq)")
    io.add_argument("--tokenizer", required=True, help="sentencepiece .model with our special tokens")
    io.add_argument("--path-field", default="path", help="manifest field/column with the image path")
    io.add_argument("--caption-field", default="caption", help="manifest field / tar .json field with the caption")
    io.add_argument("--key-field", default="key", help="optional manifest field with a unique sample key")
    io.add_argument("--image-column", default="image", help="parquet column with image bytes")
    io.add_argument("--caption-column", default="caption", help="parquet column with the caption")
    io.add_argument("--key-column", default=None, help="optional parquet column with a unique sample key")
    pp = ap.add_argument_group("processing")
    pp.add_argument("--resolution", type=int, default=256, help="square side after resize + center crop")
    pp.add_argument("--min-size", type=int, default=None,
                    help="skip images whose short side is below this (default: resolution/2)")
    pp.add_argument("--batch-size", type=int, default=None, help="VQ batch, fixed; default 32 on CUDA, 4 on CPU")
    pp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pp.add_argument("--decode-workers", type=int, default=2, help="threads decoding images (0: inline)")
    pp.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sc = ap.add_argument_group("scale-out and resume")
    add_scaleout_args(sc, 4096, "records per resumable chunk (one MDS sub-folder)", "MDS compression, e.g. zstd")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns this worker's report."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rank, world = resolve_worker(args.rank, args.world_size)
    min_size = args.resolution // 2 if args.min_size is None else args.min_size
    tokenizer = Tokenizer(args.tokenizer)
    if args.batch_size is None:
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.batch_size = 32 if cuda else 4
    encoder = CodeEncoder(args.vq, args.batch_size, args.device)
    side = encoder.grid(args.resolution)
    source = readers.image_source(
        args.input, args.format, path_field=args.path_field, caption_field=args.caption_field,
        key_field=args.key_field, image_column=args.image_column, caption_column=args.caption_column,
        key_column=args.key_column)
    all_units = source.units()
    units = partition(all_units, rank, world)
    settings = {
        "kind": "image_tokens", "inputs": [local_abspath(i) for i in args.input], "format": type(source).__name__,
        "fields": [args.path_field, args.caption_field, args.key_field, args.image_column,
                   args.caption_column, args.key_column],
        "resolution": args.resolution, "min_size": min_size, "batch_size": args.batch_size,
        "vq": local_abspath(args.vq), "codebook_size": encoder.codebook_size, "token_grid": [side, side],
        "device": encoder.device.type, "tokenizer": local_abspath(args.tokenizer),
        "special_tokens": tokenizer.special_tokens(), "vocab_size": tokenizer.vocab_size, "caption_ids": "no BOS/EOS",
    }
    if isinstance(source, readers.ParquetSource) and not args.key_column:
        settings["key_positions"] = "1-based"
    log.info("worker %d/%d: %d of %d input units; %dx%d codes of %d; VQ on %s", rank, world, len(units),
             len(all_units), side, side, encoder.codebook_size, encoder.device)
    job = ShardJob(args.out, rank, world, args.chunk_size, dict(IMAGE_TOKEN_COLUMNS), settings,
                   size_limit=args.shard_size_limit, compression=args.compression, overwrite=args.overwrite,
                   throttle=args.throttle)
    process = TokenChunkEncoder(encoder, tokenizer, args.resolution, min_size, "float16", args.decode_workers)
    try:
        report = job.run(source.stream(units), process, total=source.count(units), unit="img")
    finally:
        if process.pool is not None:
            process.pool.shutdown(cancel_futures=True)
    if world == 1 and not args.no_merge:
        merge_parts(args.out)
    return report


def cli() -> None:
    """Console entry point: errors a user must fix print as one line."""
    run_tool(main, "encode_vq_tokens")


if __name__ == "__main__":
    cli()
