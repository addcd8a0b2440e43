"""The image-caption encoding driver shared by `encode_latents` (VAE) and `encode_vq_tokens` (VQ).

Both tools read the same inputs (`data_prep.readers`), check and tokenize captions the same way,
decode images on a thread pool (`data_prep.images`), encode them in fixed-size batches with a
frozen model and write MDS rows through a partitioned, resumable `ShardJob`. They differ only in
the encoder and in the columns each image adds to its row: `ImageChunkEncoder.encode_batch` (the
chunk processor) and `EncoderSetup` (the job settings, columns and log line) carry that part.
"""

from __future__ import annotations

import abc
import argparse
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import images, readers
from .cli import local_abspath, setup_logging
from .sharding import ShardJob, Stats, add_scaleout_args, merge_parts, partition, resolve_worker
from .tokenizer import Tokenizer

# The chunk processor's warnings keep the logger name they have always had, whichever tool runs it.
chunk_log = logging.getLogger("data_prep.encode_latents")
TOKENIZE_ERROR = "tokenize_error"
ArgGroup = argparse._ArgumentGroup


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; any other name as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pad_batch(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """x [n, ...] padded with zeros to [batch_size, ...]: per-image results then do not depend on n."""
    n = x.shape[0]
    if n < batch_size:
        x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
    return x


def grid_side(resolution: int, downsample: int, model: str) -> int:
    """Side of the latent/code grid of a `resolution` image; ValueError unless `downsample` divides it."""
    if resolution % downsample:
        raise ValueError(f"--resolution {resolution} is not a multiple of {model}'s downsampling "
                         f"factor {downsample}")
    return resolution // downsample


@dataclass
class CheckedImage:
    """One record that passed every check, with its decoded pixels."""

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


class ImageChunkEncoder(abc.ABC):
    """The chunk processor: records -> checked captions -> decoded pixels -> encoded batches -> MDS rows."""

    def __init__(self, encoder: Any, tokenizer: Tokenizer, resolution: int, min_size: int, decode_workers: int):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.resolution, self.min_size = resolution, min_size
        self.pool = ThreadPoolExecutor(decode_workers) if decode_workers > 0 else None
        self.inflight = max(2 * encoder.batch_size, 4 * max(decode_workers, 1))

    @abc.abstractmethod
    def encode_batch(self, batch: list[CheckedImage]) -> list[dict[str, Any] | str]:
        """Per image of `batch`, its encoded columns for the row, or the reason it is skipped."""

    def _decode(self, item: tuple) -> tuple[torch.Tensor, tuple[int, int]]:
        return images.load_image(item[3], self.resolution, self.min_size)  # item: (record, caption, ids, bytes)

    def _checked(self, records: Iterator[readers.ImageRecord], stats: Stats,
                 tick: Callable[[int], None]) -> Iterator[tuple]:
        """(record, caption, ids, image bytes) of the records whose caption and bytes are usable."""
        for rec in records:
            reason = rec.error or readers.caption_problem(rec.caption)
            caption = (rec.caption or "").strip()
            ids: list[int] = []
            if reason is None:
                try:
                    ids = self.tokenizer.encode(caption)
                except Exception as e:  # noqa: BLE001 - one caption sentencepiece rejects must not stop the job
                    reason = TOKENIZE_ERROR
                    chunk_log.warning("%s: caption not tokenizable (%s: %s)", rec.label(), type(e).__name__, e)
            data = None
            if reason is None:
                try:
                    data = rec.read()  # in stream order, in this thread: tar/file handles are not shared
                except Exception as e:  # noqa: BLE001 - missing file, permission, network, bad tar member
                    reason = images.UNREADABLE
                    chunk_log.debug("%s unreadable: %s", rec.key, e)
            if reason is not None:
                stats.skip(reason, rec.label())
                tick(1)
                continue
            yield rec, caption, ids, data

    def __call__(self, records: Iterator[readers.ImageRecord], writer: Any, stats: Stats,
                 tick: Callable[[int], None]) -> None:
        batch: list[CheckedImage] = []
        for (rec, caption, ids, _), fut in _ordered_map(self._decode, self._checked(records, stats, tick),
                                                        self.pool, self.inflight):
            try:
                pixels, orig = fut.result()
            except images.BadImage as e:
                stats.skip(e.reason, rec.label())
                tick(1)
                continue
            except Exception as e:  # noqa: BLE001 - an image that breaks preprocessing must not stop the job
                chunk_log.warning("%s: unexpected %s while preprocessing: %s", rec.label(), type(e).__name__, e)
                stats.skip(images.CORRUPT, rec.label())
                tick(1)
                continue
            batch.append(CheckedImage(rec.key, rec.label(), rec.renamed, caption, ids, pixels, orig))
            if len(batch) == self.encoder.batch_size:
                self._flush(batch, writer, stats, tick)
                batch = []
        if batch:
            self._flush(batch, writer, stats, tick)

    def _flush(self, batch: list[CheckedImage], writer: Any, stats: Stats, tick: Callable[[int], None]) -> None:
        for g, columns in zip(batch, self.encode_batch(batch)):
            if isinstance(columns, str):
                stats.skip(columns, g.label)
                continue
            writer.write({"key": g.key, "caption": g.caption, "caption_ids": np.asarray(g.ids, dtype=np.int32),
                          **columns})
            stats.written += 1
            stats.renamed += g.renamed
        tick(len(batch))


@dataclass
class EncoderSetup:
    """A tool's loaded encoder as the driver sees it: its job settings, columns, log line and processor."""

    settings: dict[str, Any]  # the encoder's entries of job.json (after batch_size, before device)
    columns: dict[str, str]  # the MDS columns
    summary: str  # logged after "worker r/w: n of m input units; "
    device: torch.device
    processor: Callable[[Tokenizer, int], ImageChunkEncoder]  # (tokenizer, min_size) -> chunk processor


def build_encoder_parser(description: str, add_model_args: Callable[[ArgGroup], None], batch_help: str,
                 chunk_help: str, compression_help: str,
                 add_processing_args: Callable[[ArgGroup], None] | None = None) -> argparse.ArgumentParser:
    """The encoders' command line; the model's options follow --out, extra processing ones --batch-size."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of option: value defaults")
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--input", nargs="+", required=True, help="manifest(s), tar shards, parquet files, globs or a folder")
    io.add_argument("--format", default="auto", choices=["auto", "manifest", "tar", "parquet", "folder"])
    io.add_argument("--out", required=True, help="output folder (gets one part-<rank>/ sub-folder per worker)")
    add_model_args(io)
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
    pp.add_argument("--batch-size", type=int, default=None, help=batch_help)
    if add_processing_args is not None:
        add_processing_args(pp)
    pp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pp.add_argument("--decode-workers", type=int, default=2, help="threads decoding images (0: inline)")
    pp.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sc = ap.add_argument_group("scale-out and resume")
    add_scaleout_args(sc, 4096, chunk_help, compression_help)
    return ap


def encode_images(args: argparse.Namespace, log: logging.Logger, kind: str,
                  load_encoder: Callable[[argparse.Namespace], EncoderSetup]) -> dict:
    """The encoders' main flow on parsed `args`: encode this worker's inputs into shards; returns its report."""
    rank, world, min_size, tokenizer = setup_worker(args)
    encoder = load_encoder(args)
    source = readers.image_source(
        args.input, args.format, path_field=args.path_field, caption_field=args.caption_field,
        key_field=args.key_field, image_column=args.image_column, caption_column=args.caption_column,
        key_column=args.key_column)
    all_units = source.units()
    units = partition(all_units, rank, world)
    settings = {
        "kind": kind, "inputs": [local_abspath(i) for i in args.input], "format": type(source).__name__,
        "fields": [args.path_field, args.caption_field, args.key_field, args.image_column,
                   args.caption_column, args.key_column],
        "resolution": args.resolution, "min_size": min_size, "batch_size": args.batch_size,
        **encoder.settings, "device": encoder.device.type, "tokenizer": local_abspath(args.tokenizer),
        "special_tokens": tokenizer.special_tokens(), "vocab_size": tokenizer.vocab_size, "caption_ids": "no BOS/EOS",
    }
    if isinstance(source, readers.ParquetSource) and not args.key_column:
        settings["key_positions"] = "1-based"  # file:row keys; an output with older 0-based keys is not resumed
    log.info("worker %d/%d: %d of %d input units; %s", rank, world, len(units), len(all_units), encoder.summary)
    job = ShardJob(args.out, rank, world, args.chunk_size, encoder.columns, settings,
                   size_limit=args.shard_size_limit, compression=args.compression,
                   overwrite=args.overwrite, throttle=args.throttle)
    return run_worker(job, source, units, encoder.processor(tokenizer, min_size), "img", args)


def setup_worker(args: argparse.Namespace) -> tuple[int, int, int, Tokenizer]:
    """An image-encoding worker's start: logging, threads, (rank, world), min_size, the tokenizer;
    fills in the default --batch-size (32 on CUDA, 4 on CPU)."""
    setup_logging()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rank, world = resolve_worker(args.rank, args.world_size)
    min_size = args.resolution // 2 if args.min_size is None else args.min_size
    if args.batch_size is None:
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.batch_size = 32 if cuda else 4
    return rank, world, min_size, Tokenizer(args.tokenizer)


def run_worker(job: ShardJob, source: Any, units: list, process: Any, unit: str, args: argparse.Namespace) -> dict:
    """Run `process` (a chunk processor with a decode `pool`) over the worker's units; merge when it
    is the only worker; returns its report."""
    try:
        report = job.run(source.stream(units), process, total=source.count(units), unit=unit)
    finally:
        if process.pool is not None:
            process.pool.shutdown(cancel_futures=True)
    if job.world_size == 1 and not args.no_merge:
        merge_parts(args.out)
    return report
