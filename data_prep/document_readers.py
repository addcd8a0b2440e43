"""Input readers for mixed-modal documents (`data_prep.encode_documents`), local or fsspec.

Two shapes of input, each in the formats people publish them in:

- **interleaved** (OBELICS-style web documents): rows with a `texts` and an `images` list of equal
  length, where position i holds a text (`images[i]` null) or an image (`texts[i]` null); JSONL or
  Parquet. Texts are trained text, images are generated.
- **edit** (image-editing triples): `source`, `instruction`, `target` per row; JSONL, CSV or
  Parquet. The source image is a condition, the instruction context, the target generated; the
  document is source, instruction, target.

An image value is a path (relative to the input file, or a URL), raw bytes, or a Hugging Face
`Image` struct (`{bytes, path}`). Units and locations follow `data_prep.readers`: one unit per
JSONL/CSV file (split a large corpus into several files to spread it over workers) and per parquet
row group; keys are the `--key-field` value, else `<file>:<1-based line or row>`, made unique by
the duplicate-key rule. A record that cannot be a document carries its reason instead of raising
(`bad_json`, `bad_utf8`, `malformed_document`, `empty_document`); a part's own problem (a missing
image, text that is not UTF-8) stays with the part, for the encoder's rules to judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .readers import (BAD_JSON, BAD_MANIFEST_LINE, BAD_UTF8, CORRUPT_PARQUET, MISSING_IMAGE, InputFile, binary_values,
                      caption_text, list_files, log_lost_row_group, manifest_rows, parquet_damage, parquet_units,
                      read_row_group, unique_keys)

MALFORMED = "malformed_document"  # not a document of the declared shape (lists of other lengths, both or no value)
EMPTY_DOCUMENT = "empty_document"
FORMATS = ("interleaved", "edit")
EDIT_PARTS = (("source", "condition"), ("instruction", "context"), ("target", "generate"))  # (field, role), in order


@dataclass
class DocPart:
    """One part as read: text (`text`, or `error`) or an image (`read` its bytes, or `error`)."""

    name: str  # how reports name it: 'source', 'instruction', 'target', or 'text 3' / 'image 2'
    role: str  # data_prep.schema.ROLES
    text: str | None = None
    read: Callable[[], bytes] | None = None
    error: str | None = None  # bad_utf8, missing_image, ...

    @property
    def is_image(self) -> bool:
        return self.role in ("generate", "condition")


@dataclass
class DocumentRecord:
    """One input document, or the reason it cannot be one."""

    key: str
    parts: list[DocPart] = field(default_factory=list)
    error: str | None = None
    where: str | None = None  # 1-based location when the key does not say it
    renamed: bool = False

    def label(self) -> str:
        return self.key if not self.where or self.where == self.key else f"{self.key} ({self.where})"


def image_value(value: Any, f: InputFile, name: str, role: str) -> DocPart:
    """An image cell (path, bytes, {bytes, path} struct, None) -> the part that reads it."""
    if isinstance(value, dict):  # Hugging Face `Image` feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return DocPart(name, role, read=lambda: data)
    if isinstance(value, str) and value.strip():
        fs, path = f.sibling(value.strip())
        return DocPart(name, role, read=lambda: fs.cat_file(path))
    return DocPart(name, role, error=MISSING_IMAGE)


def text_value(value: Any, name: str, role: str) -> DocPart:
    text, error = caption_text(value)
    return DocPart(name, role, text=text, error=error)


class DocumentSource:
    """Documents of one shape (`interleaved` or `edit`) from JSONL/CSV/Parquet files."""

    def __init__(self, files: list[InputFile], shape: str, *, texts_field: str = "texts", images_field: str = "images",
                 source_field: str = "source", instruction_field: str = "instruction", target_field: str = "target",
                 key_field: str | None = None):
        if shape not in FORMATS:
            raise ValueError(f"document format must be one of {FORMATS}, got {shape!r}")
        self.files, self.shape, self.key_field = files, shape, key_field
        if shape == "interleaved":
            self.fields = [texts_field, images_field]
            if any(f.path.lower().endswith(".csv") for f in files):
                raise ValueError("interleaved documents are read from JSONL or Parquet (a CSV cell cannot hold a list)")
        else:
            self.fields = [source_field, instruction_field, target_field]

    def units(self) -> list[tuple[InputFile, int, int, int]]:
        """(file, -2, 0, 0) per JSONL/CSV file; (file, row group, first row, rows) per parquet row
        group, row group -1 marking a damaged parquet file."""
        tables = [f for f in self.files if f.path.lower().endswith(".parquet")]
        columns = self.fields + ([self.key_field] if self.key_field else [])
        lines = [(f, -2, 0, 0) for f in self.files if f not in tables]
        return sorted(lines + parquet_units(tables, columns), key=lambda u: (u[0].path, u[1]))

    def stream(self, units: Sequence[tuple]) -> Iterator[DocumentRecord]:
        """The documents of `units`, in order, under the duplicate-key rule."""
        return unique_keys(self._records(units))

    def count(self, units: Sequence[tuple]) -> int | None:
        return None if any(u[1] == -2 for u in units) else sum(max(u[3], 1) for u in units)

    def _records(self, units: Sequence[tuple]) -> Iterator[DocumentRecord]:
        for f, rg, offset, n in units:
            if rg == -1:
                yield DocumentRecord(f.name, error=parquet_damage(f))
            elif rg == -2:
                for line, row, reason in manifest_rows(f, self.fields[0]):
                    where = f"{f.name}:{line}"
                    if reason is not None:
                        yield DocumentRecord(where, error=BAD_JSON if reason == BAD_MANIFEST_LINE else reason)
                    else:
                        yield self._document(f, row, where)
            else:
                yield from self._parquet(f, rg, offset, n)

    def _parquet(self, f: InputFile, rg: int, offset: int, n: int) -> Iterator[DocumentRecord]:
        columns = self.fields + ([self.key_field] if self.key_field else [])
        try:
            table = read_row_group(f, rg, columns)
        except (OSError, ValueError) as e:
            log_lost_row_group(f, rg, n, e)
            for i in range(n):
                yield DocumentRecord(f"{f.name}:{offset + i + 1}", error=CORRUPT_PARQUET)
            return
        # Text as raw bytes (pyarrow fails on invalid UTF-8, which is ours to count); image cells as found.
        texts = [self.fields[0]] if self.shape == "interleaved" else [self.fields[1]]
        values = {c: table.column(c).to_pylist() for c in columns}
        for c in texts + ([self.key_field] if self.key_field else []):
            values[c] = (_binary_lists if self.shape == "interleaved" and c in texts else binary_values)(table.column(c))
        for i in range(n):
            yield self._document(f, {c: values[c][i] for c in columns}, f"{f.name}:{offset + i + 1}")

    def _document(self, f: InputFile, row: dict, where: str) -> DocumentRecord:
        key = row.get(self.key_field) if self.key_field else None
        if isinstance(key, bytes):
            key = key.decode("utf-8", "backslashreplace")
        rec = DocumentRecord(str(key) if key not in (None, "") else where, where=where)
        if self.shape == "edit":
            rec.parts = [image_value(row.get(c), f, name, role) if role != "context" else text_value(row.get(c), name, role)
                         for c, (name, role) in zip(self.fields, EDIT_PARTS)]
            return rec
        texts, images = row.get(self.fields[0]), row.get(self.fields[1])
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            rec.error = MALFORMED
            return rec
        if not texts:
            rec.error = EMPTY_DOCUMENT
            return rec
        n_text = n_image = 0
        for text, image in zip(texts, images):
            if (text is None) == (image is None):  # both, or neither: which modality is this position?
                rec.error, rec.parts = MALFORMED, []
                return rec
            if text is not None:
                n_text += 1
                rec.parts.append(text_value(text, f"text {n_text}", "text"))
            else:
                n_image += 1
                rec.parts.append(image_value(image, f, f"image {n_image}", "generate"))
        return rec


def _binary_lists(column: Any) -> list:
    """A parquet list<string> column as lists of raw bytes (None kept), so bad UTF-8 is ours to count."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_list(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        column = column.cast(pa.list_(pa.binary()))
    elif pa.types.is_large_list(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        column = column.cast(pa.large_list(pa.large_binary()))
    return column.to_pylist()


def document_source(inputs: Sequence[str], shape: str, **fields: Any) -> DocumentSource:
    """The reader of `inputs` (paths/globs/folders of .jsonl, .csv, .parquet) for documents of `shape`."""
    return DocumentSource(list_files(inputs, (".jsonl", ".json", ".csv", ".parquet")), shape, **fields)
