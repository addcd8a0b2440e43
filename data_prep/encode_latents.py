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

if not __package__:  # run as a file (`python data_prep/encode_latents.py`): import it as part of the package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "data_prep"

import argparse
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import images, readers
from .cli import local_abspath, parse_with_config, run_tool, setup_logging
from .schema import image_columns, latents_to_storage, storage_to_tensor
from .sharding import ShardJob, Stats, add_scaleout_args, merge_parts, partition, resolve_worker
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.encode_latents")
NONFINITE = "nonfinite_latent"
TOKENIZE_ERROR = "tokenize_error"


class LatentEncoder:
    """A frozen AutoencoderKL that maps image batches to scaled posterior (mean, std)."""

    def __init__(self, vae_path: str, batch_size: int = 32, device: str = "auto", subfolder: str | None = None):
        from diffusers import AutoencoderKL

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
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
        if resolution % self.downsample:
            raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                             f"factor {self.downsample}")
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, 3, R, R] in [-1, 1] -> scaled (mean, std), each fp32 [n, C, R/f, R/f] on the CPU."""
        n = x.shape[0]
        if n < self.batch_size:  # fixed batch shape: per-image results do not depend on n
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
        x = x.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            dist = self.vae.encode(x).latent_dist  # parameters [B, 2C, h, w]
        mean, std = dist.mean[:n].float(), dist.std[:n].float()
        if self.shift_factor is not None:
            mean = mean - self.shift_factor
        return (mean * self.scaling_factor).cpu(), (std * self.scaling_factor).cpu()


@dataclass
class _Good:
    key: str
    label: str  # key + location, for the report
    renamed: bool
    caption: str
    ids: list[int]
    pixels: torch.Tensor  # [3, R, R]
    orig: tuple[int, int]  # (height, width)


def _ordered_map(fn: Callable, items: Iterator, pool: ThreadPoolExecutor | None, inflight: int) -> Iterator:
    """(item, future of fn(item)) in input order, with at most `inflight` pending."""
    queue: deque[tuple[Any, Future]] = deque()
    for item in items:
        if pool is None:
            f: Future = Future()
            try:
                f.set_result(fn(item))
            except Exception as e:  # noqa: BLE001 - surfaced by f.result() in the consumer
                f.set_exception(e)
            yield item, f
            continue
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= inflight:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class ChunkEncoder:
    """The chunk processor: records -> checked captions -> decoded pixels -> latents -> MDS rows."""

    def __init__(self, encoder: LatentEncoder, tokenizer: Tokenizer, resolution: int, min_size: int,
                 latent_dtype: str, decode_workers: int):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.resolution, self.min_size, self.latent_dtype = resolution, min_size, latent_dtype
        self.pool = ThreadPoolExecutor(decode_workers) if decode_workers > 0 else None
        self.inflight = max(2 * encoder.batch_size, 4 * max(decode_workers, 1))

    def _decode(self, item: tuple) -> tuple[torch.Tensor, tuple[int, int]]:
        return images.load_image(item[3], self.resolution, self.min_size)  # item: (record, caption, ids, bytes)

    def __call__(self, records: Iterator[readers.ImageRecord], writer: Any, stats: Stats,
                 tick: Callable[[int], None]) -> None:
        def checked() -> Iterator[tuple]:
            for rec in records:
                reason = rec.error or readers.caption_problem(rec.caption)
                caption = (rec.caption or "").strip()
                ids: list[int] = []
                if reason is None:
                    try:
                        ids = self.tokenizer.encode(caption)
                    except Exception as e:  # noqa: BLE001 - one caption sentencepiece rejects must not stop the job
                        reason = TOKENIZE_ERROR
                        log.warning("%s: caption not tokenizable (%s: %s)", rec.label(), type(e).__name__, e)
                data = None
                if reason is None:
                    try:
                        data = rec.read()  # in stream order, in this thread: tar/file handles are not shared
                    except Exception as e:  # noqa: BLE001 - missing file, permission, network, bad tar member
                        reason = images.UNREADABLE
                        log.debug("%s unreadable: %s", rec.key, e)
                if reason is not None:
                    stats.skip(reason, rec.label())
                    tick(1)
                    continue
                yield rec, caption, ids, data

        batch: list[_Good] = []
        for (rec, caption, ids, _), fut in _ordered_map(self._decode, checked(), self.pool, self.inflight):
            try:
                pixels, orig = fut.result()
            except images.BadImage as e:
                stats.skip(e.reason, rec.label())
                tick(1)
                continue
            except Exception as e:  # noqa: BLE001 - an image that breaks preprocessing must not stop the job
                log.warning("%s: unexpected %s while preprocessing: %s", rec.label(), type(e).__name__, e)
                stats.skip(images.CORRUPT, rec.label())
                tick(1)
                continue
            batch.append(_Good(rec.key, rec.label(), rec.renamed, caption, ids, pixels, orig))
            if len(batch) == self.encoder.batch_size:
                self._flush(batch, writer, stats, tick)
                batch = []
        if batch:
            self._flush(batch, writer, stats, tick)

    def _flush(self, batch: list[_Good], writer: Any, stats: Stats, tick: Callable[[int], None]) -> None:
        mean, std = self.encoder(torch.stack([g.pixels for g in batch]))  # [n, C, h, w] each
        mean_s = latents_to_storage(mean, self.latent_dtype)
        std_s = latents_to_storage(std, self.latent_dtype)
        finite = (storage_to_tensor(mean_s).isfinite().flatten(1).all(1)
                  & storage_to_tensor(std_s).isfinite().flatten(1).all(1))
        for i, g in enumerate(batch):
            if not finite[i]:  # e.g. fp16 overflow of a degenerate image
                stats.skip(NONFINITE, g.label)
                continue
            writer.write({"key": g.key, "caption": g.caption, "caption_ids": np.asarray(g.ids, dtype=np.int32),
                          "latent_mean": mean_s[i], "latent_std": std_s[i],
                          "orig_size": np.asarray(g.orig, dtype=np.int32)})
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
    io.add_argument("--vae", required=True, help="AutoencoderKL folder written by save_pretrained")
    io.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a diffusers pipeline folder")
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
    pp.add_argument("--batch-size", type=int, default=None,
                    help="VAE batch, fixed (part of the output's identity); default 32 on CUDA, 4 on CPU "
                         "(bigger CPU batches fall out of cache and run slower per image)")
    pp.add_argument("--latent-dtype", default="float16", choices=["float16", "bfloat16"])
    pp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pp.add_argument("--decode-workers", type=int, default=2, help="threads decoding images (0: inline)")
    pp.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sc = ap.add_argument_group("scale-out and resume")
    add_scaleout_args(sc, 4096, "records per resumable chunk (one MDS sub-folder; ~64 MB of 256px latents)",
                      "MDS compression, e.g. zstd (latents compress poorly)")
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
    encoder = LatentEncoder(args.vae, args.batch_size, args.device, args.vae_subfolder)
    latent_shape = encoder.latent_shape(args.resolution)
    source = readers.image_source(
        args.input, args.format, path_field=args.path_field, caption_field=args.caption_field,
        key_field=args.key_field, image_column=args.image_column, caption_column=args.caption_column,
        key_column=args.key_column)
    all_units = source.units()
    units = partition(all_units, rank, world)
    settings = {
        "kind": "image_caption", "inputs": [local_abspath(i) for i in args.input], "format": type(source).__name__,
        "fields": [args.path_field, args.caption_field, args.key_field, args.image_column,
                   args.caption_column, args.key_column],
        "resolution": args.resolution, "min_size": min_size, "batch_size": args.batch_size,
        "vae": local_abspath(args.vae), "vae_subfolder": args.vae_subfolder,
        "scaling_factor": encoder.scaling_factor, "shift_factor": encoder.shift_factor,
        "latent_shape": list(latent_shape), "latent_dtype": args.latent_dtype, "device": encoder.device.type,
        "tokenizer": local_abspath(args.tokenizer), "special_tokens": tokenizer.special_tokens(),
        "vocab_size": tokenizer.vocab_size, "caption_ids": "no BOS/EOS",
    }
    if isinstance(source, readers.ParquetSource) and not args.key_column:
        settings["key_positions"] = "1-based"  # file:row keys; an output with older 0-based keys is not resumed
    log.info("worker %d/%d: %d of %d input units; latents %s %s; VAE on %s", rank, world, len(units),
             len(all_units), latent_shape, args.latent_dtype, encoder.device)
    job = ShardJob(args.out, rank, world, args.chunk_size, image_columns(latent_shape, args.latent_dtype),
                   settings, size_limit=args.shard_size_limit, compression=args.compression,
                   overwrite=args.overwrite, throttle=args.throttle)
    process = ChunkEncoder(encoder, tokenizer, args.resolution, min_size, args.latent_dtype, args.decode_workers)
    try:
        report = job.run(source.stream(units), process, total=source.count(units), unit="img")
    finally:
        if process.pool is not None:
            process.pool.shutdown(cancel_futures=True)
    if world == 1 and not args.no_merge:
        merge_parts(args.out)
    return report


def cli() -> None:
    """Console entry point (`transfusion-encode-latents`): errors a user must fix print as one line."""
    run_tool(main, "encode_latents")


if __name__ == "__main__":
    cli()
