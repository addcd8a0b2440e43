"""Megatron-LM indexed datasets (PREFIX.bin/.idx) <-> our MDS text shards, and a one-time id scan.

    python -m data_prep.megatron_convert to-mds PREFIX --out shards/text --tokenizer tok.model
    python -m data_prep.megatron_convert from-mds shards/text --prefix corpus/text_document
    python -m data_prep.megatron_convert scan PREFIX

`to-mds` turns a Megatron corpus into text shards (for object-store streaming; partitioned by
`--rank/--world-size` and resumable like tokenize_text), `from-mds` writes our text shards as a
Megatron prefix with megatron-core's own `IndexedDatasetBuilder` (usable by Megatron-LM), `scan`
writes PREFIX.stats.json (token count and id range) so a `kind: megatron` stream of a large corpus
needs no full read at start-up.

BOS/EOS rule, the same both ways so that MDS -> Megatron -> MDS gives identical documents: our
shards hold BOS + ids + EOS; Megatron documents hold ids + EOD (`preprocess_data.py --append-eod`),
EOD being our EOS. `from-mds` drops the leading BOS and keeps EOS; `to-mds` adds BOS (`--no-bos`
not to) and adds EOS only with `--add-eos` (for corpora made without `--append-eod`). Empty
documents are skipped and counted. `to-mds --eod legacy` reads a corpus made with Megatron-LM's
legacy SentencePiece wrapper, whose EOD is the tokenizer's size + 2, writing that id as EOS (the
`eod: legacy` of a training stream; data_prep/megatron_reader.py).
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .cli import local_abspath, parse_with_config, run_tool, setup_logging
from .megatron_reader import (
    DOCS_PER_SHARD, corpus_stats, document_ids, indexed_dataset_module, open_indexed, stats_path, vocabulary_problem,
)
from .schema import TEXT_COLUMNS, check_index
from .sharding import ShardJob, Stats, add_scaleout_args, merge_parts, partition, resolve_worker
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.megatron_convert")
EMPTY = "empty_document"


def _documents(ds: Any, units: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, ids) over [lo, hi) document ranges of an IndexedDataset."""
    for lo, hi in units:
        for d in range(lo, hi):
            yield d, document_ids(ds, d)


class _ToRows:
    """Chunk processor: Megatron documents -> BOS? + ids + EOS? rows of the text schema."""

    def __init__(self, name: str, bos: int | None, eos: int | None, eod_to_eos: tuple[int, int] | None = None) -> None:
        self.name, self.head = name, [bos] if bos is not None else []
        self.tail = [eos] if eos is not None else []
        self.eod_to_eos = eod_to_eos  # (legacy EOD id, EOS id) for --eod legacy

    def __call__(self, records: Iterator[tuple[int, np.ndarray]], writer: Any, stats: Stats,
                 tick: Callable[[int], None]) -> None:
        for doc, ids in records:
            key = f"{self.name}:{doc + 1}"  # 1-based, like every data_prep key
            if ids.size == 0:
                stats.skip(EMPTY, key)
            else:
                if self.eod_to_eos is not None:
                    ids[ids == self.eod_to_eos[0]] = self.eod_to_eos[1]
                writer.write({"key": key, "tokens": np.concatenate([self.head, ids, self.tail]).astype(np.int32)})
                stats.written += 1
            tick(1)


def to_mds(args: argparse.Namespace) -> dict:
    """Megatron prefix -> MDS text shards (this worker's share of the documents)."""
    if args.eod == "legacy" and args.add_eos:
        raise ValueError("--eod legacy writes each document's EOD as EOS: --add-eos would add a second one")
    tokenizer = Tokenizer(args.tokenizer)
    ds = open_indexed(args.prefix)
    problem = vocabulary_problem(args.prefix, corpus_stats(args.prefix, ds), tokenizer.vocab_size,
                                 f"the size of {args.tokenizer}", args.eod, option="--eod legacy")
    if problem:
        raise ValueError(problem)
    n = len(ds.document_indices) - 1
    units = [(lo, min(lo + DOCS_PER_SHARD, n)) for lo in range(0, n, DOCS_PER_SHARD)]
    rank, world = resolve_worker(args.rank, args.world_size)
    mine = partition(units, rank, world)
    settings = {
        "kind": "text", "inputs": [local_abspath(args.prefix)], "tokenizer": local_abspath(args.tokenizer),
        "special_tokens": tokenizer.special_tokens(), "vocab_size": tokenizer.vocab_size,
        "tokens": f"{'BOS + ' if args.bos else ''}ids{' + EOS' if args.add_eos else ''} (from Megatron)",
        "key_positions": "1-based",
    }
    job = ShardJob(args.out, rank, world, args.chunk_size, TEXT_COLUMNS, settings,
                   size_limit=args.shard_size_limit, compression=args.compression, overwrite=args.overwrite,
                   throttle=args.throttle)
    rows = _ToRows(Path(args.prefix).name, tokenizer.bos_id if args.bos else None,
                   tokenizer.eos_id if args.add_eos else None,
                   (tokenizer.vocab_size + 2, tokenizer.eos_id) if args.eod == "legacy" else None)
    report = job.run(_documents(ds, mine), rows, total=sum(hi - lo for lo, hi in mine), unit="doc")
    if world == 1 and not args.no_merge:
        merge_parts(args.out)
    return report


def from_mds(args: argparse.Namespace) -> dict:
    """MDS text shards -> one Megatron prefix, written with megatron-core's IndexedDatasetBuilder."""
    check_index(args.shards, kind="text")  # before anything can decode a sample
    import torch
    from streaming import StreamingDataset

    megatron = indexed_dataset_module()
    DType, IndexedDatasetBuilder = megatron.DType, megatron.IndexedDatasetBuilder

    info_path = Path(args.shards) / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    bos = (info.get("special_tokens") or {}).get("bos")
    if bos is None and not args.keep_bos:
        raise ValueError(f"{info_path} does not say the BOS id to drop; pass --keep-bos to keep every token")
    dtype = DType.optimal_dtype(info.get("vocab_size"))
    ds = StreamingDataset(local=args.shards, shuffle=False, batch_size=1)
    Path(args.prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{args.prefix}.bin", dtype=dtype)
    written = 0
    for i in range(ds.num_samples):
        ids = np.asarray(ds[i]["tokens"], dtype=np.int64)
        if not args.keep_bos and ids.size and ids[0] == bos:
            ids = ids[1:]
        builder.add_document(torch.from_numpy(ids), [len(ids)])
        written += 1
    builder.finalize(f"{args.prefix}.idx")
    stats = corpus_stats(args.prefix)
    stats_path(args.prefix).write_text(json.dumps(stats, indent=1))
    report = {"documents": written, "prefix": args.prefix, "dtype": np.dtype(dtype).name, **stats}
    log.info("wrote %s.bin/.idx: %d documents, %d tokens", args.prefix, written, stats["tokens"])
    return report


def scan(args: argparse.Namespace) -> dict:
    """Write PREFIX.stats.json: tokens, documents, id range and document ends, read once."""
    stats = corpus_stats(args.prefix, open_indexed(args.prefix))  # checks the files first: one-line errors
    stats_path(args.prefix).write_text(json.dumps(stats, indent=1))
    log.info("%s: %s", stats_path(args.prefix), stats)
    return stats


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-mds", help="Megatron prefix -> MDS text shards")
    to.add_argument("prefix", help="Megatron dataset prefix (PREFIX.bin + PREFIX.idx)")
    to.add_argument("--out", required=True, help="output shard folder")
    to.add_argument("--tokenizer", required=True, help="the sentencepiece .model the corpus was made with")
    to.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS to each document")
    to.add_argument("--add-eos", action="store_true", help="append EOS (corpora made without --append-eod)")
    to.add_argument("--eod", choices=("eos", "legacy"), default="eos",
                    help="legacy: made with Megatron-LM's legacy SentencePiece wrapper, whose EOD (the tokenizer's "
                    "size + 2) is written as EOS")
    add_scaleout_args(to, 100_000, "documents per resumable chunk", "MDS compression, e.g. zstd")
    frm = sub.add_parser("from-mds", help="MDS text shards -> Megatron prefix")
    frm.add_argument("shards", help="text shard folder (with index.json and dataset_info.json)")
    frm.add_argument("--prefix", required=True, help="output prefix (writes PREFIX.bin, .idx, .stats.json)")
    frm.add_argument("--keep-bos", action="store_true", help="keep the leading BOS of each document")
    sc = sub.add_parser("scan", help="write PREFIX.stats.json (token count and id range)")
    sc.add_argument("prefix")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the command's report."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    return {"to-mds": to_mds, "from-mds": from_mds, "scan": scan}[args.command](args)


def cli() -> None:
    """Console entry point (`transfusion-megatron-convert`)."""
    run_tool(main, "megatron_convert")


if __name__ == "__main__":
    cli()
