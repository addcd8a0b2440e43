"""Text-document readers for tokenize_text: `.txt`/`.md`, JSONL and Parquet, local or fsspec paths.

Same contract as the image readers in `data_prep.readers`: deterministic units that workers
partition, records that carry a skip reason instead of raising (text that is not valid UTF-8,
malformed JSON, missing or empty text), a damaged parquet file counted once under its name, an
unreadable row group counted once per row. Keys are 1-based locations: `<file>:<line>` (a
paragraph's first line, a JSONL line), `<file>:<row>` for Parquet, `<file>` for whole-file
documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Sequence

from .readers import (BAD_JSON, BAD_UTF8, CORRUPT_PARQUET, InputFile, binary_values, caption_text, list_files,
                      log_lost_row_group, parquet_damage, parquet_units, read_row_group)

MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"


@dataclass
class TextRecord:
    """One text document, or the reason it is unusable."""

    key: str
    text: str | None
    error: str | None = None


class TextSource:
    """Text corpora: `.txt` (paragraph or file documents), `.jsonl` (a text field), `.parquet`."""

    def __init__(self, files: list[InputFile], doc_split: str = "paragraph", text_field: str = "text"):
        if doc_split not in ("paragraph", "file"):
            raise ValueError(f"doc split must be 'paragraph' or 'file', got {doc_split!r}")
        self.files, self.doc_split, self.text_field = files, doc_split, text_field

    def units(self) -> list[tuple[InputFile, int, int, int]]:
        """(file, -2, 0, 0) per text file; (file, row group, first row, rows) for parquet, where
        row group -1 marks a damaged parquet file."""
        texts = [(f, -2, 0, 0) for f in self.files if not f.path.endswith(".parquet")]
        tables = parquet_units([f for f in self.files if f.path.endswith(".parquet")], [self.text_field])
        return sorted(texts + tables, key=lambda u: (u[0].path, u[1]))

    def records(self, units: Sequence[tuple[InputFile, int, int, int]]) -> Iterator[TextRecord]:
        for f, rg, offset, n in units:
            if rg == -1:
                yield TextRecord(f.name, None, parquet_damage(f))
            elif rg >= 0:
                yield from self._parquet(f, rg, offset, n)
            elif f.path.endswith((".jsonl", ".json")):
                yield from self._jsonl(f)
            else:
                yield from self._txt(f)

    def _txt(self, f: InputFile) -> Iterator[TextRecord]:
        data = f.fs.cat_file(f.path)
        if self.doc_split == "file":
            text, error = caption_text(data)
            yield _text_record(f.name, text, error)
            return
        para: list[str] = []
        bad, start = False, 0
        for i, line in enumerate(data.split(b"\n") + [b""], 1):
            if line.strip():
                s, error = caption_text(line.rstrip(b"\r"))
                bad |= error is not None
                start = start or i
                para.append(s or "")
                continue
            if para:
                yield _text_record(f"{f.name}:{start}", "\n".join(para), BAD_UTF8 if bad else None)
                para, bad, start = [], False, 0

    def _jsonl(self, f: InputFile) -> Iterator[TextRecord]:
        for i, line in enumerate(f.fs.cat_file(f.path).split(b"\n"), 1):
            if not line.strip():
                continue
            key = f"{f.name}:{i}"
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield TextRecord(key, None, BAD_UTF8)
                continue
            except json.JSONDecodeError:
                yield TextRecord(key, None, BAD_JSON)
                continue
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if text is None:
                yield TextRecord(key, None, MISSING_TEXT)
                continue
            yield _text_record(key, *caption_text(text))

    def _parquet(self, f: InputFile, rg: int, offset: int, n: int) -> Iterator[TextRecord]:
        try:
            values = binary_values(read_row_group(f, rg, [self.text_field]).column(0))
        except (OSError, ValueError) as e:  # pyarrow's errors are OSError/ValueError subclasses
            log_lost_row_group(f, rg, n, e)
            for i in range(n):
                yield TextRecord(f"{f.name}:{offset + i + 1}", None, CORRUPT_PARQUET)
            return
        for i, v in enumerate(values):
            key = f"{f.name}:{offset + i + 1}"
            if v is None:
                yield TextRecord(key, None, MISSING_TEXT)
            else:
                yield _text_record(key, *caption_text(v))

    def count(self, units: Sequence) -> int | None:
        return None


def text_source(inputs: Sequence[str], doc_split: str = "paragraph", text_field: str = "text") -> TextSource:
    """Reader over .txt/.md, .jsonl and .parquet files found in `inputs` (paths, globs, folders)."""
    return TextSource(list_files(inputs, (".txt", ".md", ".jsonl", ".json", ".parquet")), doc_split, text_field)



def _text_record(key: str, text: str | None, error: str | None = None) -> TextRecord:
    if error is None and (text is None or not text.strip()):
        error = EMPTY_TEXT
    return TextRecord(key, text, error)
