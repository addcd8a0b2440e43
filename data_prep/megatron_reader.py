"""Reading Megatron-LM indexed datasets (PREFIX.bin + PREFIX.idx) with megatron-core, checked.

Shared by the `kind: megatron` training stream (trainer/megatron_corpus.py) and
`data_prep.megatron_convert`. Every problem with a corpus is a MegatronCorpusError whose message
is one line naming the prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class MegatronCorpusError(ValueError):
    """A missing, damaged or unusable Megatron corpus (one line, naming the prefix)."""


DOCS_PER_SHARD = 4096  # documents per pseudo-shard: the unit the epoch shuffle permutes
SCAN_LIMIT = 1 << 30  # tokens; larger corpora need PREFIX.stats.json for the start-up check
_SCAN_CHUNK = 1 << 24


def stats_path(prefix: str) -> Path:
    return Path(f"{prefix}.stats.json")


def open_indexed(prefix: str) -> Any:
    """megatron-core's IndexedDataset over prefix, after checking both files; one-line errors."""
    missing = [f"{prefix}{ext}" for ext in (".idx", ".bin") if not os.path.isfile(f"{prefix}{ext}")]
    if missing:
        raise MegatronCorpusError(f"Megatron corpus '{prefix}': {' and '.join(missing)} not found "
                          "(a stream's path is the prefix, without .bin/.idx)")
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise MegatronCorpusError("kind: megatron streams need megatron-core: pip install 'transfusion[megatron]'") from None
    try:
        ds = IndexedDataset(prefix)
    except Exception as e:  # a damaged .idx fails inside numpy/struct with no file name
        raise MegatronCorpusError(f"Megatron corpus '{prefix}': {prefix}.idx cannot be read ({type(e).__name__}: {e})") from None
    index = ds.index
    if len(index):
        need = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        have = os.path.getsize(f"{prefix}.bin")
        if have < need:
            raise MegatronCorpusError(f"Megatron corpus '{prefix}': {prefix}.bin has {have} bytes but its index needs {need} "
                              "(an interrupted copy?)")
    return ds


def document_ids(ds: Any, doc: int) -> np.ndarray:
    """Token ids of Megatron document `doc` (its sequences concatenated), int64."""
    lo, hi = int(ds.document_indices[doc]), int(ds.document_indices[doc + 1])
    return np.concatenate(ds[lo:hi]).astype(np.int64) if hi > lo else np.zeros(0, np.int64)


def corpus_stats(prefix: str, ds: Any | None = None) -> dict[str, int]:
    """{'tokens', 'max_id', 'min_id', 'documents'} of a corpus, from PREFIX.stats.json when it
    matches the .bin's size, else by reading every token."""
    size = os.path.getsize(f"{prefix}.bin")
    path = stats_path(prefix)
    if path.is_file():
        stats = json.loads(path.read_text())
        if stats.get("bin_bytes") == size:
            return stats
    ds = ds if ds is not None else open_indexed(prefix)
    tokens = int(np.sum(ds.index.sequence_lengths, dtype=np.int64))
    data = np.memmap(f"{prefix}.bin", dtype=ds.index.dtype, mode="r")
    max_id, min_id = -1, 0 if tokens == 0 else int(data[0])
    for lo in range(0, tokens, _SCAN_CHUNK):
        chunk = data[lo: min(lo + _SCAN_CHUNK, tokens)]
        max_id, min_id = max(max_id, int(chunk.max())), min(min_id, int(chunk.min()))
    return {"tokens": tokens, "max_id": max_id, "min_id": min_id, "documents": len(ds.document_indices) - 1,
            "bin_bytes": size}
