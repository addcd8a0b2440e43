"""Partitioned, resumable MDS shard writing shared by encode_latents and tokenize_text.

Layout of an output folder (one `part-*` per worker, one `chunk-*` per fixed-size chunk):

    out/
      index.json, report.json, dataset_info.json   <- written by the merge step
      part-00000/
        job.json                                    <- the worker's settings (checked on rerun)
        index.json, report.json                     <- written when the worker finishes
        chunk-000000/{shard.00000.mds, index.json, done.json}
        chunk-000001/...
        .tmp-chunk-000002/                          <- in progress; removed on restart

Worker `rank` of `world_size` takes a contiguous block of the reader's units; its records are cut
into chunks of `chunk_size` records in stream order. A chunk is written to a temp folder, gets a
`done.json` (its counts), then is renamed into place: a chunk folder with `done.json` is complete,
anything else is redone. Records are deterministic in content and order, so a rerun after a crash
yields exactly the samples of an uninterrupted run. (On object stores, where rename is not atomic,
the `done.json` written last is the commit marker.)

Every index this module merges (committed chunks, parts) first passes `schema.check_index`, so a
part folder planted or altered with columns outside our schema (e.g. `pkl`) is refused by name.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from .schema import SchemaError, check_index

log = logging.getLogger("data_prep")
T = TypeVar("T")
MAX_EXAMPLES = 5  # keys kept per skip reason and chunk, to find the bad inputs


def resolve_worker(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from the CLI, else SLURM array variables, else RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ
    if (rank is None) != (world_size is None):
        raise ValueError("pass both --rank and --world-size, or neither")
    if rank is None:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            world_size = int(env["SLURM_ARRAY_TASK_COUNT"])
            src = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (use a contiguous --array=0-N)"
        elif "RANK" in env and "WORLD_SIZE" in env:
            rank, world_size, src = int(env["RANK"]), int(env["WORLD_SIZE"]), "RANK/WORLD_SIZE"
        else:
            rank, world_size, src = 0, 1, "default"
    else:
        src = "--rank/--world-size"
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"worker rank {rank} is not in [0, {world_size}) (from {src})")
    return rank, world_size


def add_scaleout_args(group: argparse._ActionsContainer, chunk_size: int, chunk_help: str, compression_help: str) -> None:
    """The partition / chunking / resume options shared by the encoders' command lines."""
    group.add_argument("--rank", type=int, default=None, help="default: SLURM_ARRAY_TASK_ID or RANK, else 0")
    group.add_argument("--world-size", type=int, default=None,
                       help="default: SLURM_ARRAY_TASK_COUNT or WORLD_SIZE, else 1")
    group.add_argument("--chunk-size", type=int, default=chunk_size, help=chunk_help)
    group.add_argument("--shard-size-limit", type=int, default=1 << 26, help="bytes per MDS shard file")
    group.add_argument("--compression", default=None, help=compression_help)
    group.add_argument("--overwrite", action="store_true", help="delete this worker's earlier output first")
    group.add_argument("--no-merge", action="store_true", help="with one worker, do not write the merged index")
    group.add_argument("--throttle", type=float, default=0.0, help="testing aid: seconds to wait before each commit")


def partition(units: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Contiguous block `rank` of `world_size` near-equal blocks, so merged parts keep input order."""
    n = len(units)
    return list(units[n * rank // world_size: n * (rank + 1) // world_size])


@dataclass
class Stats:
    """Counts of one chunk (or a sum of chunks): records seen, samples written, skips by reason.

    `examples` names up to MAX_EXAMPLES records per reason and chunk (keys, with 1-based
    locations); `renamed` counts samples written under a `key#n` name (duplicate keys); `dropped`
    counts parts removed from documents that were written (encode_documents' drop_image rule),
    by reason, with examples under `dropped <reason>`.
    """

    records: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    renamed: int = 0
    dropped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, key)

    def drop(self, reason: str, key: str) -> None:
        """A part of a written document removed for `reason` (`key` names the document and part)."""
        self.dropped[reason] += 1
        self._example(f"dropped {reason}", key)

    def _example(self, reason: str, key: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(key)

    def add(self, other: "Stats") -> None:
        self.records += other.records
        self.written += other.written
        self.renamed += other.renamed
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        for reason, keys in other.examples.items():
            ex = self.examples.setdefault(reason, [])
            ex += keys[: max(0, 4 * MAX_EXAMPLES - len(ex))]

    def to_dict(self) -> dict:
        out = {"records": self.records, "written": self.written, "skipped_total": sum(self.skipped.values()),
               "skipped": dict(sorted(self.skipped.items())), "examples": self.examples,
               "renamed_duplicate_keys": self.renamed}
        if self.dropped:
            out["dropped_parts"] = dict(sorted(self.dropped.items()))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        return cls(d["records"], d["written"], Counter(d["skipped"]), d.get("examples", {}),
                   d.get("renamed_duplicate_keys", 0), Counter(d.get("dropped_parts", {})))

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        renamed = f", {self.renamed} under renamed duplicate keys" if self.renamed else ""
        dropped = ("; parts dropped from written documents: " + ", ".join(
            f"{k} {v}" for k, v in sorted(self.dropped.items()))) if self.dropped else ""
        return (f"{self.records} records, {self.written} written{renamed}, {sum(self.skipped.values())} skipped "
                f"({reasons}){dropped}")


class _Counted:
    """Iterator wrapper that counts what was taken from it."""

    def __init__(self, it: Iterator):
        self.it, self.n = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        x = next(self.it)
        self.n += 1
        return x


def _chunks(items: Iterable[T], size: int) -> Iterator[Iterator[T]]:
    """Lazy chunks of `size` items; each chunk must be exhausted before asking for the next."""
    it = iter(items)
    for first in it:
        yield itertools.chain((first,), itertools.islice(it, size - 1))


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON durably: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A chunk processor reads records, writes samples with `writer.write`, counts skips in `stats`
# and calls `tick(n)` as records are consumed (for the progress bar).
ChunkProcessor = Callable[[Iterator[Any], MDSWriter, Stats, Callable[[int], None]], None]


class ShardJob:
    """One worker's resumable run: chunked MDS output under `out/part-{rank:05d}`."""

    def __init__(self, out: str | Path, rank: int, world_size: int, chunk_size: int,
                 columns: dict[str, str], settings: dict[str, Any], *, size_limit: int = 1 << 26,
                 compression: str | None = None, overwrite: bool = False, throttle: float = 0.0):
        if chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
        self.out, self.rank, self.world_size, self.chunk_size = Path(out), rank, world_size, chunk_size
        self.part = self.out / f"part-{rank:05d}"
        self.columns, self.size_limit, self.compression = columns, size_limit, compression
        self.throttle = throttle  # testing aid: seconds to wait before each chunk commit
        self.settings = {**settings, "columns": columns, "world_size": world_size, "chunk_size": chunk_size,
                         "compression": compression}
        self.overwrite = overwrite

    def chunk_dir(self, idx: int) -> Path:
        return self.part / f"chunk-{idx:06d}"

    def _prepare(self) -> None:
        """Create/check the part folder: same settings as before, no stale temp chunks."""
        if self.overwrite and self.part.exists():
            shutil.rmtree(self.part)
        self.part.mkdir(parents=True, exist_ok=True)
        job_path = self.part / "job.json"
        want = {**self.settings, "rank": self.rank}
        if job_path.exists():
            have = json.loads(job_path.read_text())
            diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
            if diff:
                detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"{self.part} was written with other settings ({detail}). Rerun with the "
                                 f"same settings to resume, or use a new --out, or pass --overwrite")
        else:
            _write_json(job_path, want)
        for stale in self.part.glob(".tmp-chunk-*"):
            shutil.rmtree(stale)

    def _done(self, idx: int) -> Stats | None:
        marker = self.chunk_dir(idx) / "done.json"
        return Stats.from_dict(json.loads(marker.read_text())) if marker.exists() else None

    def run(self, records: Iterable[Any], process: ChunkProcessor, total: int | None = None,
            unit: str = "rec") -> dict:
        """Process all records chunk by chunk (skipping committed chunks); returns the worker report."""
        with self._lock():
            self._prepare()
            done_before = sum(1 for _ in self.part.glob("chunk-*/done.json"))
            t0, totals, fresh = time.time(), Stats(), Stats()
            tty = sys.stderr.isatty()
            bar = tqdm(total=total, unit=unit, unit_scale=True, desc=f"part {self.rank}/{self.world_size}",
                       initial=min(done_before * self.chunk_size, total or 0), dynamic_ncols=True,
                       mininterval=0.5 if tty else 30.0)
            n_chunks = resumed = 0
            for idx, chunk in enumerate(_chunks(records, self.chunk_size)):
                n_chunks += 1
                counted = _Counted(chunk)
                stats = self._done(idx)
                if stats is not None:  # committed by an earlier run: skip without decoding anything
                    for _ in counted:
                        pass
                    if counted.n != stats.records:
                        raise RuntimeError(f"{self.chunk_dir(idx)} holds {stats.records} records but the input "
                                           f"now gives {counted.n}: the input changed since the earlier run; "
                                           f"use a new --out or --overwrite")
                    resumed += 1
                else:
                    stats = self._write_chunk(idx, counted, process, bar.update)
                    fresh.add(stats)
                totals.add(stats)
                bar.set_postfix_str(f"written {totals.written} skipped {sum(totals.skipped.values())}", refresh=False)
            bar.close()
            stale = sorted(c.name for c in self.part.glob("chunk-*") if int(c.name.split("-")[1]) >= n_chunks)
            if stale:
                raise RuntimeError(f"{self.part} has chunks {stale} beyond the {n_chunks} the input gives now: the "
                                   f"input changed since the earlier run; use a new --out or --overwrite")
            elapsed = time.time() - t0
            report = {"rank": self.rank, "world_size": self.world_size, "complete": True, "chunks": n_chunks,
                      "chunks_resumed": resumed, **totals.to_dict(), "elapsed_s": round(elapsed, 3),
                      "records_per_s_this_run": round(fresh.records / max(elapsed, 1e-9), 2)}
            _merge_quiet([str(self.chunk_dir(i) / "index.json") for i in range(n_chunks)], self.part)
            _write_json(self.part / "report.json", report)
        log.info("part %d/%d done: %s; %d of %d chunks resumed; %.1fs", self.rank, self.world_size,
                 totals.summary(), resumed, n_chunks, elapsed)
        for reason, keys in totals.examples.items():
            log.info("  %s e.g. %s", reason, ", ".join(keys[:MAX_EXAMPLES]))
        return report

    def _write_chunk(self, idx: int, records: _Counted, process: ChunkProcessor,
                     tick: Callable[[int], None]) -> Stats:
        tmp = self.part / f".tmp-chunk-{idx:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        stats = Stats()
        writer = MDSWriter(out=str(tmp), columns=self.columns, compression=self.compression,
                           size_limit=self.size_limit)
        process(records, writer, stats, tick)
        for _ in records:  # a processor that stopped early still owns the rest of its chunk
            pass
        writer.finish()
        stats.records = records.n
        if self.throttle:
            time.sleep(self.throttle)
        for f in tmp.iterdir():  # data reaches the disk before the marker that vouches for it
            _fsync(f)
        _write_json(tmp / "done.json", stats.to_dict())
        final = self.chunk_dir(idx)
        if final.exists():  # an incomplete chunk folder (no done.json) from a non-atomic store
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.part)
        return stats

    @contextlib.contextmanager
    def _lock(self):
        """Refuse to run two workers on the same part (e.g. a requeued task overlapping the old one)."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out / f".part-{self.rank:05d}.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another process is writing {self.part}; wait for it or kill it") from None
            yield


def _merge_quiet(index_files: list[str], out: Path) -> None:
    """streaming's merge_index (shard paths become relative to `out`), without its warnings.

    Each input index is checked against our schema first (one-line SchemaError naming it).
    """
    kinds = {check_index(p) for p in index_files} - {"empty"}
    if len(kinds) > 1:
        raise SchemaError(f"{out}: its parts mix image and text shards; they cannot form one dataset")
    if not index_files:  # merge_index writes nothing for an empty list; readers want an index
        _write_json(out / "index.json", {"version": 2, "shards": []})
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out))
    try:  # merge into a temp folder, then atomically replace the index (merge_index refuses to overwrite)
        merge_index([os.path.abspath(p) for p in index_files], str(tmp))
        os.replace(tmp / "index.json", out / "index.json")
    finally:
        logging.disable(previous)
        shutil.rmtree(tmp, ignore_errors=True)


def merge_parts(out: str | Path, allow_partial: bool = False) -> dict:
    """Write `out/index.json` over all parts' committed chunks, plus the merged report and info."""
    out = Path(out)
    parts = sorted(p for p in out.glob("part-*") if (p / "job.json").exists())
    if not parts:
        raise FileNotFoundError(f"no part-*/job.json under {out}: run encode_latents/tokenize_text first")
    jobs = [json.loads((p / "job.json").read_text()) for p in parts]
    ref = {k: v for k, v in jobs[0].items() if k != "rank"}
    for p, j in zip(parts, jobs):
        other = {k: v for k, v in j.items() if k != "rank"}
        if other != ref:
            bad = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise ValueError(f"{p} was written with other settings than {parts[0]} (keys {bad}); "
                             f"these parts cannot be merged into one dataset")
    world = ref["world_size"]
    missing = sorted(set(range(world)) - {j["rank"] for j in jobs})
    incomplete = [p.name for p in parts if not _complete(p)]
    problems = ([f"missing parts {missing}"] if missing else []) + (
        [f"unfinished parts {incomplete}"] if incomplete else [])
    if problems and not allow_partial:
        raise RuntimeError(f"cannot merge {out}: {'; '.join(problems)} of world size {world}. Rerun those "
                           f"workers (finished chunks are kept), or pass --allow-partial")
    totals, per_part, part_indexes = Stats(), {}, []
    for p in parts:
        chunks = sorted(c for c in p.glob("chunk-*") if (c / "done.json").exists())
        stats = Stats()
        for c in chunks:
            stats.add(Stats.from_dict(json.loads((c / "done.json").read_text())))
        _merge_quiet([str(c / "index.json") for c in chunks], p)
        part_indexes.append(str(p / "index.json"))
        per_part[p.name] = {"chunks": len(chunks), "complete": _complete(p), **stats.to_dict()}
        totals.add(stats)
    _merge_quiet(part_indexes, out)
    report = {"parts": len(parts), "world_size": world, "complete": not problems, "problems": problems,
              **totals.to_dict(), "per_part": per_part}
    _write_json(out / "report.json", report)
    info = {**ref, "num_samples": totals.written}
    _write_json(out / "dataset_info.json", info)
    log.info("merged %d parts into %s/index.json: %s", len(parts), out, totals.summary())
    return report


def _complete(part: Path) -> bool:
    r = part / "report.json"
    return r.exists() and json.loads(r.read_text()).get("complete", False)
