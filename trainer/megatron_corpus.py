"""Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`) as a text stream, read in place.

Teams that already hold corpora tokenized by Megatron-LM's `preprocess_data.py` train on them
without re-tokenizing: a stream of `kind: megatron` names the prefix, and this adapter gives the
streaming source what it needs from any stream (`num_samples`, `samples_per_shard`, samples by id),
so mixing by tokens, per-rank partitioning and exact/elastic resume are the ones of MDS streams
(trainer/sample_order.py). megatron-core's own `IndexedDataset` reads the files (memory-mapped).

One sample is one Megatron *document* (`document_indices`; a document may hold several
sequences, e.g. with `--split-sentences`), its sequences concatenated. BOS/EOS rule (per stream,
explicit): `add_bos` prepends the model's BOS, `add_eos` appends its EOS; a corpus made with
`--append-eod` already ends each document with EOD, so it takes `add_eos: false`. Empty documents
are skipped (counted in `empty`). Ids must fit the model's text vocabulary (`model.vocab_size`, or
`model.image_token_offset` with image tokens): the start-up check reads the whole corpus once (or
a `PREFIX.stats.json` written by `data_prep.megatron_convert scan`), and every document read is
checked again. `eod: legacy`: the corpus was made with Megatron-LM's legacy SentencePiece wrapper,
whose EOD is V + 2 (V = the text vocabulary); that id becomes EOS (data_prep/megatron_reader.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_prep.megatron_reader import (
    DOCS_PER_SHARD, SCAN_LIMIT, MegatronCorpusError, corpus_stats, document_ids, ids_beyond, open_indexed, read_stats,
    stats_path, vocabulary_problem,
)
from config import ConfigError


class MegatronCorpus:
    """Documents of one Megatron prefix by id, with the stream's BOS/EOS rule applied."""

    def __init__(self, prefix: str, limit: int, limit_name: str, bos: int, eos: int, add_bos: bool, add_eos: bool,
                 eod: str = "eos") -> None:
        """`limit`: the text vocabulary (ids 0..limit-1), named `limit_name` in errors."""
        self.prefix, self.limit, self.limit_name, self.eod = prefix, limit, limit_name, eod
        self.eos = eos
        self.legacy_eod = limit + 2 if eod == "legacy" else None
        try:
            self.ds = open_indexed(prefix)
        except MegatronCorpusError as e:
            raise ConfigError(str(e)) from None
        self.num_samples = len(self.ds.document_indices) - 1
        if self.num_samples == 0:
            raise ConfigError(f"Megatron corpus '{prefix}' holds no documents")
        self.prefix_ids = np.array([bos] if add_bos else [], dtype=np.int64)
        self.suffix_ids = np.array([eos] if add_eos else [], dtype=np.int64)
        self.empty = 0  # empty documents met (skipped by the caller)
        self._check_vocabulary()

    @property
    def samples_per_shard(self) -> np.ndarray:
        full, rest = divmod(self.num_samples, DOCS_PER_SHARD)
        return np.array([DOCS_PER_SHARD] * full + ([rest] if rest else []), dtype=np.int64)

    def _check_vocabulary(self) -> None:
        tokens = int(np.sum(self.ds.index.sequence_lengths, dtype=np.int64))
        if tokens > SCAN_LIMIT and read_stats(self.prefix) is None:
            raise ConfigError(
                f"Megatron corpus '{self.prefix}' holds {tokens:,} tokens: check its ids once with "
                f"`python -m data_prep.megatron_convert scan {self.prefix}` (writes {stats_path(self.prefix).name}) "
                "instead of reading it all at every start"
                + (" (the one there is out of date)" if stats_path(self.prefix).is_file() else "")
            )
        problem = vocabulary_problem(self.prefix, corpus_stats(self.prefix, self.ds), self.limit, self.limit_name,
                                     self.eod)
        if problem:
            raise ConfigError(problem)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, doc: int) -> dict[str, Any]:
        """{'key': 'name:doc' (1-based), 'tokens': BOS? + ids + EOS?} of document `doc`; tokens is None
        for an empty document."""
        key = f"{Path(self.prefix).name}:{doc + 1}"
        ids = document_ids(self.ds, doc)
        if ids.size == 0:
            self.empty += 1
            return {"key": key, "tokens": None}
        if self.legacy_eod is not None:
            ids[ids == self.legacy_eod] = self.eos
        if ids.max() >= self.limit or ids.min() < 0:  # the corpus changed since the start-up check
            raise ConfigError(f"Megatron corpus '{self.prefix}' document {doc + 1} "
                              f"{ids_beyond(int(ids.min()), int(ids.max()), self.limit, self.limit_name)}")
        return {"key": key, "tokens": np.concatenate([self.prefix_ids, ids, self.suffix_ids])}
