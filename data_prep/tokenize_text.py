"""Tokenize text corpora into MDS shards of token ids (BOS + ids + EOS per document).

Inputs: `.txt`/`.md` files (one document per blank-line-separated paragraph, or per file with
`--doc-split file`), JSONL with a text field, Parquet with a text column (`--text-field`).
Text that is not valid UTF-8 (undecodable bytes, JSON `\\udce9` escapes), bad JSON, missing or empty
texts, texts sentencepiece rejects and damaged parquet files are skipped and counted. Keys are
1-based locations: `file:line` (a paragraph's first line, a JSONL line), `file:row` (Parquet).
Partitioning (`--rank/--world-size` or SLURM/torchrun variables; units are files, or parquet row
groups), resumable chunks and reports work as in encode_latents (see `data_prep.sharding`).

    python -m data_prep.tokenize_text --input corpus/ --out shards/text --tokenizer tok/tokenizer.model
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import text_readers
from .cli import local_abspath, parse_with_config, run_tool, setup_logging
from .schema import TEXT_COLUMNS
from .sharding import ShardJob, Stats, add_scaleout_args, merge_parts, partition, resolve_worker
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.tokenize_text")
TOKENIZE_ERROR = "tokenize_error"


class ChunkTokenizer:
    """The chunk processor: text records -> BOS + ids + EOS rows, tokenized in batches."""

    def __init__(self, tokenizer: Tokenizer, batch_docs: int = 512):
        self.tokenizer, self.batch_docs = tokenizer, batch_docs

    def __call__(self, records: Iterator[text_readers.TextRecord], writer: Any, stats: Stats,
                 tick: Callable[[int], None]) -> None:
        batch: list[text_readers.TextRecord] = []
        for rec in records:
            if rec.error:
                stats.skip(rec.error, rec.key)
                tick(1)
                continue
            batch.append(rec)
            if len(batch) == self.batch_docs:
                self._flush(batch, writer, stats, tick)
                batch = []
        if batch:
            self._flush(batch, writer, stats, tick)

    def _flush(self, batch: list[text_readers.TextRecord], writer: Any, stats: Stats,
               tick: Callable[[int], None]) -> None:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        try:
            encoded: list[list[int] | None] = self.tokenizer.encode_batch([r.text for r in batch])
        except Exception:  # noqa: BLE001 - one text sentencepiece rejects: find it, keep the others
            encoded = [self._encode_one(r) for r in batch]
        for rec, ids in zip(batch, encoded):
            if ids is None:
                stats.skip(TOKENIZE_ERROR, rec.key)
                continue
            writer.write({"key": rec.key, "tokens": np.asarray([bos, *ids, eos], dtype=np.int32)})
            stats.written += 1
        tick(len(batch))

    def _encode_one(self, rec: text_readers.TextRecord) -> list[int] | None:
        try:
            return self.tokenizer.encode(rec.text)
        except Exception as e:  # noqa: BLE001 - counted as tokenize_error
            log.warning("%s: text not tokenizable (%s: %s)", rec.key, type(e).__name__, e)
            return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of option: value defaults")
    ap.add_argument("--input", nargs="+", required=True, help="text/markdown, jsonl, parquet files, globs or folders")
    ap.add_argument("--out", required=True, help="output folder (gets one part-<rank>/ sub-folder per worker)")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model with our special tokens")
    ap.add_argument("--doc-split", default="paragraph", choices=["paragraph", "file"],
                    help="for .txt/.md: a document per blank-line-separated paragraph, or per file")
    ap.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    add_scaleout_args(ap, 10_000, "documents per resumable chunk", "MDS compression, e.g. zstd")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns this worker's report."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    rank, world = resolve_worker(args.rank, args.world_size)
    tokenizer = Tokenizer(args.tokenizer)
    source = text_readers.text_source(args.input, args.doc_split, args.text_field)
    all_units = source.units()
    units = partition(all_units, rank, world)
    settings = {
        "kind": "text", "inputs": [local_abspath(i) for i in args.input], "doc_split": args.doc_split,
        "text_field": args.text_field, "tokenizer": local_abspath(args.tokenizer),
        "special_tokens": tokenizer.special_tokens(), "vocab_size": tokenizer.vocab_size,
        "tokens": "BOS + ids + EOS", "key_positions": "1-based",  # outputs with older 0-based keys are not resumed
    }
    log.info("worker %d/%d: %d of %d input units", rank, world, len(units), len(all_units))
    job = ShardJob(args.out, rank, world, args.chunk_size, TEXT_COLUMNS, settings,
                   size_limit=args.shard_size_limit, compression=args.compression, overwrite=args.overwrite,
                   throttle=args.throttle)
    report = job.run(source.records(units), ChunkTokenizer(tokenizer), unit="doc")
    if world == 1 and not args.no_merge:
        merge_parts(args.out)
    return report


def cli() -> None:
    """Console entry point (`transfusion-tokenize-text`): errors a user must fix print as one line."""
    run_tool(main, "tokenize_text")


if __name__ == "__main__":
    cli()
