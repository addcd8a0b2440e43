"""Reading Megatron-LM indexed datasets (PREFIX.bin + PREFIX.idx) with megatron-core, checked.

Shared by the `kind: megatron` training stream (trainer/megatron_corpus.py) and
`data_prep.megatron_convert`. Every problem with a corpus is a MegatronCorpusError whose message
is one line naming the prefix.

Megatron-LM's legacy tokenizer wrapper for SentencePiece (`--tokenizer-type SentencePieceTokenizer`:
the only tokenizer system up to megatron-core 0.14, `--legacy-tokenizer` since; class
`_SentencePieceTokenizer` in Megatron-LM's megatron/training/tokenizer/tokenizer.py) appends
special tokens after the model's V pieces, in this order, each unless the model already has that
piece: <CLS> = V, <SEP> = V + 1, <EOD> = V + 2, <MASK> = V + 3, then <PAD>/<BOS>/<EOS> only for a
model without pad/bos/eos pieces (ours have them: 0/1/2). Its `eod` is <EOD>, so
`preprocess_data.py --append-eod` ends each non-empty document with V + 2, and literal
special-token text in a document (`<s>`, `</s>`, `<pad>`, `<MASK>`, ...) becomes that token's id.
`eod: legacy` streams map V + 2 to our EOS (legacy_problem says what else is refused); the
wrapper's GPTSentencePieceTokenizer/Llama2Tokenizer/HuggingFaceTokenizer use the model's own EOS
as EOD and need nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class MegatronCorpusError(ValueError):
    """A missing, damaged or unusable Megatron corpus (one line, naming the prefix)."""


DOCS_PER_SHARD = 4096  # documents per pseudo-shard: the unit the epoch shuffle permutes
SCAN_LIMIT = 1 << 30  # tokens; larger corpora need PREFIX.stats.json for the start-up check
_SCAN_CHUNK = 1 << 24  # tokens read at a time
_DOC_CHUNK = 1 << 20  # documents whose last token is read at a time


LEGACY_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")  # ids V, V + 1, V + 2, V + 3 (see above)
STATS_KEYS = ("tokens", "max_id", "min_id", "documents", "bin_bytes", "last_id", "max_other_id")


def stats_path(prefix: str) -> Path:
    return Path(f"{prefix}.stats.json")


@contextlib.contextmanager
def _quiet_megatron_import() -> Iterator[None]:
    """Silence what importing megatron-core says on a machine without Transformer Engine, Apex or a
    GPU (UserWarnings 'Transformer Engine and Apex are not installed', torch's 'No CUDA runtime is
    found' log line): only those messages, only around the import."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    no_cuda = lambda record: not str(record.msg).startswith("No CUDA runtime is found")  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
        cpp_log.addFilter(no_cuda)
        try:
            yield
        finally:
            cpp_log.removeFilter(no_cuda)


def indexed_dataset_module() -> Any:
    """megatron-core's `datasets.indexed_dataset` (IndexedDataset, IndexedDatasetBuilder, DType),
    imported without its import-time noise; one-line error when megatron-core is missing."""
    try:
        with _quiet_megatron_import():
            from megatron.core.datasets import indexed_dataset
    except ImportError:
        raise MegatronCorpusError("Megatron corpora need megatron-core: pip install 'transfusion[megatron]'") from None
    return indexed_dataset


def open_indexed(prefix: str) -> Any:
    """megatron-core's IndexedDataset over prefix, after checking both files; one-line errors."""
    missing = [f"{prefix}{ext}" for ext in (".idx", ".bin") if not os.path.isfile(f"{prefix}{ext}")]
    if missing:
        raise MegatronCorpusError(f"Megatron corpus '{prefix}': {' and '.join(missing)} not found "
                          "(a stream's path is the prefix, without .bin/.idx)")
    IndexedDataset = indexed_dataset_module().IndexedDataset
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


def read_stats(prefix: str) -> dict[str, Any] | None:
    """PREFIX.stats.json when it describes the current .bin (same size, every key), else None."""
    path = stats_path(prefix)
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    current = stats.get("bin_bytes") == os.path.getsize(f"{prefix}.bin") and all(k in stats for k in STATS_KEYS)
    return stats if current else None


def _document_ends(ds: Any) -> Iterator[np.ndarray]:
    """Token offsets (into .bin, in tokens) of the last token of each non-empty document, in blocks.

    Relies on what every IndexedDatasetBuilder writes: a document's sequences lie back to back."""
    index, docs = ds.index, np.asarray(ds.document_indices, dtype=np.int64)
    n = len(docs) - 1
    for lo in range(0, n, _DOC_CHUNK):
        hi = min(lo + _DOC_CHUNK, n)
        first, last = docs[lo:hi], docs[lo + 1: hi + 1] - 1
        has = last >= first  # documents with at least one sequence
        first, last = first[has], last[has]
        start = np.asarray(index.sequence_pointers[first], dtype=np.int64) // index.dtype_size
        end = (np.asarray(index.sequence_pointers[last], dtype=np.int64) // index.dtype_size
               + np.asarray(index.sequence_lengths[last], dtype=np.int64))
        yield end[end > start] - 1


def corpus_stats(prefix: str, ds: Any | None = None) -> dict[str, Any]:
    """Token count, id range and document ends of a corpus, from PREFIX.stats.json when it matches
    the .bin, else by reading every token: {'tokens', 'max_id', 'min_id', 'documents', 'bin_bytes',
    'last_id' (the id every non-empty document ends with, None when they differ), 'max_other_id'
    (the largest id other than last_id; -1 if none)}."""
    stats = read_stats(prefix)
    if stats is not None:
        return stats
    size = os.path.getsize(f"{prefix}.bin")
    ds = ds if ds is not None else open_indexed(prefix)
    tokens = int(np.sum(ds.index.sequence_lengths, dtype=np.int64))
    data = np.memmap(f"{prefix}.bin", dtype=ds.index.dtype, mode="r") if tokens else np.zeros(0, np.int64)
    last_ids: set[int] = set()
    for ends in _document_ends(ds):
        last_ids.update(np.unique(data[ends]).tolist())
        if len(last_ids) > 1:
            break
    last = last_ids.pop() if len(last_ids) == 1 else None
    max_id, min_id, max_other = -1, 0 if tokens == 0 else int(data[0]), -1
    for lo in range(0, tokens, _SCAN_CHUNK):
        chunk = data[lo: min(lo + _SCAN_CHUNK, tokens)]
        top = int(chunk.max())
        max_id, min_id = max(max_id, top), min(min_id, int(chunk.min()))
        if top != last:
            max_other = max(max_other, top)
        else:
            other = chunk[chunk != last]
            max_other = max(max_other, int(other.max()) if other.size else -1)
    return {"tokens": tokens, "max_id": max_id, "min_id": min_id, "documents": len(ds.document_indices) - 1,
            "bin_bytes": size, "last_id": last, "max_other_id": max_other}


def vocabulary_problem(prefix: str, stats: dict[str, Any], limit: int, limit_name: str, eod: str = "eos",
                       option: str = "`eod: legacy` on its stream") -> str | None:
    """Why a corpus's ids do not fit a text vocabulary of `limit` ids (named `limit_name`, e.g.
    'model.vocab_size'), in one line; None when they fit. eod='legacy': the corpus was made with the
    legacy SentencePiece wrapper (module docstring), V = limit, and EOD = V + 2 becomes EOS; a corpus
    that looks like one without it is refused naming `option`."""
    if eod == "legacy":
        return legacy_problem(prefix, stats, limit, limit_name)
    eod_id = limit + 2
    if stats["min_id"] >= 0 and stats["max_id"] < limit:
        return None
    if stats["last_id"] == eod_id and 0 <= stats["min_id"] and stats["max_other_id"] < limit:
        return (f"Megatron corpus '{prefix}' ends every document with id {eod_id} = {limit_name} + 2, the EOD of "
                "Megatron-LM's legacy SentencePiece tokenizer (preprocess_data.py --tokenizer-type "
                f"SentencePieceTokenizer up to megatron-core 0.14, or --legacy-tokenizer since): set {option} "
                "to read that id as EOS")
    return f"Megatron corpus '{prefix}' {ids_beyond(stats['min_id'], stats['max_id'], limit, limit_name)}"


def ids_beyond(low: int, high: int, limit: int, limit_name: str) -> str:
    """'holds token ...' for ids low..high of which one lies outside a text vocabulary of `limit` ids
    (the tail of a one-line error)."""
    if limit_name == "model.vocab_size":
        return (f"holds token ids {low}..{high} but model.vocab_size={limit}: it was tokenized with another "
                "vocabulary (see the stream's tokenizer)")
    if not limit_name.startswith("model."):  # a tokenizer's size (to-mds)
        return f"holds token ids {low}..{high} but {limit_name} is {limit}: it was made with another tokenizer"
    bad = high if high >= limit else low
    return (f"holds token id {bad} but text ids lie below {limit_name}={limit} (the image codes start there): it "
            f"was tokenized with another vocabulary, or {limit_name} is wrong")


def legacy_problem(prefix: str, stats: dict[str, Any], limit: int, limit_name: str) -> str | None:
    """The refusal of an `eod: legacy` corpus that is not one (see vocabulary_problem); None when fine.

    Every non-empty document must end with EOD = V + 2 (preprocess_data.py --append-eod); EOD
    elsewhere (literal '<EOD>' text) also becomes EOS; ids below V, among them the model's own
    <pad>/<s>/</s> from literal text, are kept; the wrapper's <CLS>/<SEP>/<MASK> (V, V + 1, V + 3)
    and anything else at or above V have no id in our model and are refused."""
    eod_id, last = limit + 2, stats["last_id"]
    if stats["tokens"] == 0:
        return None
    if last is None:
        return (f"Megatron corpus '{prefix}': eod: legacy expects every document to end with EOD {eod_id} = "
                f"{limit_name} + 2 (preprocess_data.py --append-eod), but they end with ids other than it; drop "
                "eod: legacy (with add_eos: true for a corpus made without --append-eod)")
    if last != eod_id:
        return (f"Megatron corpus '{prefix}': its documents end with id {last}, not EOD {eod_id} = {limit_name} + 2 "
                f"as eod: legacy expects (EOD {last} would mean a SentencePiece model of {last - 2} pieces; "
                f"{limit_name} must be its size)")
    high = stats["max_other_id"]
    if limit <= high < limit + len(LEGACY_SPECIALS):
        name = LEGACY_SPECIALS[high - limit]
        return (f"Megatron corpus '{prefix}' holds id {high}, the legacy tokenizer's {name} (literal '{name}' text "
                "in a source document), which has no id in this model")
    if high >= limit or stats["min_id"] < 0:
        return f"Megatron corpus '{prefix}' {ids_beyond(stats['min_id'], high, limit, limit_name)}"
    return None
