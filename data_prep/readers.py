"""Input readers: image-caption records and text documents from local or fsspec paths.

A reader lists cheap, deterministic *units* (manifest lines, tar files, parquet row groups, text
files); workers partition the unit list, then stream records from their units in order. Paths go
through fsspec, so `s3://`/`gs://` inputs work where the matching fsspec backend is installed.

Records carry a reason string instead of raising when the input itself is malformed (bad manifest
line, undecodable text) so that the job counts and skips it.
"""

from __future__ import annotations

import abc

import csv
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from fsspec.core import url_to_fs

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# Record-level skip reasons.
BAD_MANIFEST_LINE = "bad_manifest_line"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
BAD_UTF8 = "bad_utf8"
BAD_JSON = "bad_json"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"


@dataclass(frozen=True)
class InputFile:
    """One input file: its filesystem, path in it, and the short name used in sample keys."""

    fs: Any
    path: str
    name: str

    def open(self):
        return self.fs.open(self.path, "rb")

    def sibling(self, rel: str) -> tuple[Any, str]:
        """Resolve a path written inside this file (relative to its folder, or a full URL)."""
        if "://" in rel:
            fs, p = url_to_fs(rel)
            return fs, p
        if rel.startswith("/"):
            return self.fs, rel
        return self.fs, posixpath.normpath(posixpath.join(posixpath.dirname(self.path), rel))


def list_files(patterns: Sequence[str], exts: Sequence[str], recursive: bool = True) -> list[InputFile]:
    """Expand paths/globs/folders (any fsspec URL) into a sorted, de-duplicated file list."""
    out: dict[str, InputFile] = {}
    for pattern in patterns:
        fs, path = url_to_fs(pattern)
        if any(c in path for c in "*?["):
            hits = [p for p in fs.glob(path) if fs.isfile(p)]
            base = posixpath.dirname(path.split("*")[0].split("?")[0].split("[")[0])
        elif fs.isdir(path):
            hits = fs.find(path) if recursive else [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
            base = path.rstrip("/")
        elif fs.exists(path):
            hits, base = [path], posixpath.dirname(path)
        else:
            raise FileNotFoundError(f"input {pattern} does not exist")
        for p in sorted(hits):
            if p.lower().endswith(tuple(exts)):
                out.setdefault(p, InputFile(fs, p, posixpath.relpath(p, base) if base else p))
    if not out:
        raise FileNotFoundError(f"no {'/'.join(exts)} files found in {list(patterns)}")
    return [out[k] for k in sorted(out)]


# ----------------------------------------------------------------------------- image-caption


@dataclass
class ImageRecord:
    """One image-caption pair; `read()` fetches the image bytes (call before advancing the stream)."""

    key: str
    caption: str | None  # None: no caption at all
    read: Callable[[], bytes] | None
    error: str | None = None  # set when the record itself is malformed


class ImageSource(abc.ABC):
    """Base of image-caption readers: `units()` to partition, `records(units)` to stream."""

    @abc.abstractmethod
    def units(self) -> list:
        """The work units (files, tar members, row groups) that workers partition."""

    @abc.abstractmethod
    def records(self, units: Sequence) -> Iterator[ImageRecord]:
        """Stream the records of `units`, in order."""

    def count(self, units: Sequence) -> int | None:
        """Number of records in `units` if known without reading them (for the progress bar)."""
        return None


class ManifestSource(ImageSource):
    """JSONL or CSV manifests with a path and a caption per line (paths relative to the manifest).

    Keys: the `key_field` if present, else the path; a path listed again (several captions for one
    image) gets `#1`, `#2`, ... so keys stay unique.
    """

    def __init__(self, files: list[InputFile], path_field: str = "path", caption_field: str = "caption",
                 key_field: str = "key"):
        self.files, self.path_field, self.caption_field, self.key_field = files, path_field, caption_field, key_field

    def _rows(self, f: InputFile) -> Iterator[tuple[int, dict | None]]:
        data = f.fs.cat_file(f.path)
        if f.path.lower().endswith(".csv"):
            text = data.decode("utf-8-sig", errors="surrogateescape")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if self.path_field not in (reader.fieldnames or []):
                raise ValueError(f"{f.path} has no '{self.path_field}' column (columns: {reader.fieldnames}); "
                                 f"set --path-field/--caption-field")
            for i, row in enumerate(reader):
                ok = all(v is None or isinstance(v, str) and _is_utf8(v) for v in row.values())
                yield i, dict(row) if ok else None
            return
        for i, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                yield i, row if isinstance(row, dict) else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield i, None

    def units(self) -> list[tuple]:
        entries, seen = [], {}
        for f in self.files:
            for line_no, row in self._rows(f):
                path = row.get(self.path_field) if row else None
                if not path or not isinstance(path, str):
                    entries.append((f"{f.name}:{line_no}", None, None, None, BAD_MANIFEST_LINE))
                    continue
                key = str(row.get(self.key_field) or path)
                n = seen.get(key, 0)
                seen[key] = n + 1
                key = key if n == 0 else f"{key}#{n}"  # same image listed with several captions
                cap = row.get(self.caption_field)
                fs, p = f.sibling(path)
                entries.append((key, fs, p, None if cap is None else str(cap), None))
        if entries and all(e[4] for e in entries):
            raise ValueError(f"no manifest line in {[f.path for f in self.files]} has a '{self.path_field}' "
                             f"field; set --path-field/--caption-field")
        return entries

    def records(self, units: Sequence[tuple]) -> Iterator[ImageRecord]:
        for key, fs, path, caption, error in units:
            read = (lambda fs=fs, path=path: fs.cat_file(path)) if fs is not None else None
            yield ImageRecord(key, caption, read, error)

    def count(self, units: Sequence) -> int:
        return len(units)


class FolderSource(ImageSource):
    """A folder of images; captions come from a sidecar `<stem>.txt` when present."""

    def __init__(self, root: str):
        self.images = list_files([root], IMAGE_EXTS)
        fs, base = url_to_fs(root)
        self.fs = fs
        self.texts = {p for p in fs.find(base) if p.endswith(".txt")}

    def units(self) -> list[InputFile]:
        return self.images

    def records(self, units: Sequence[InputFile]) -> Iterator[ImageRecord]:
        for f in units:
            txt = posixpath.splitext(f.path)[0] + ".txt"
            caption = _decode_or_none(self.fs.cat_file(txt)) if txt in self.texts else None
            yield ImageRecord(f.name, caption, lambda f=f: f.fs.cat_file(f.path))

    def count(self, units: Sequence) -> int:
        return len(units)


class TarSource(ImageSource):
    """WebDataset-style tar shards: members sharing a key (name up to the first dot) form a sample.

    The image is the first member with an image extension; the caption is the `.txt` member, else
    the `caption_field` of the `.json` member. Keys are `<tar name without .tar>/<member key>`.
    """

    def __init__(self, files: list[InputFile], caption_field: str = "caption"):
        self.files, self.caption_field = files, caption_field

    def units(self) -> list[InputFile]:
        return self.files

    def records(self, units: Sequence[InputFile]) -> Iterator[ImageRecord]:
        for f in units:
            prefix = f.name[: -len(".tar")] if f.name.endswith(".tar") else f.name
            with f.open() as fh, tarfile.open(fileobj=fh, mode="r:*") as tf:
                group: list[tarfile.TarInfo] = []
                for m in tf:
                    if not m.isfile():
                        continue
                    if group and _wds_key(m.name) != _wds_key(group[0].name):
                        yield self._record(tf, prefix, group)
                        group = []
                    group.append(m)
                if group:
                    yield self._record(tf, prefix, group)

    def _record(self, tf: tarfile.TarFile, prefix: str, group: list[tarfile.TarInfo]) -> ImageRecord:
        key = f"{prefix}/{_wds_key(group[0].name)}"
        by_ext = {m.name[len(_wds_key(m.name)):].lower(): m for m in group}
        image = next((m for ext, m in by_ext.items() if ext.endswith(IMAGE_EXTS)), None)
        caption = None
        if ".txt" in by_ext:
            caption = _decode_or_none(tf.extractfile(by_ext[".txt"]).read())
        elif ".json" in by_ext:
            try:
                meta = json.loads(tf.extractfile(by_ext[".json"]).read())
                caption = meta.get(self.caption_field) if isinstance(meta, dict) else None
                caption = None if caption is None else str(caption)
            except (UnicodeDecodeError, json.JSONDecodeError):
                caption = None
        if image is None:
            return ImageRecord(key, caption, None, MISSING_IMAGE)
        return ImageRecord(key, caption, lambda: tf.extractfile(image).read())


class ParquetSource(ImageSource):
    """Parquet files with image bytes (binary, or a {bytes, path} struct) and a caption column."""

    def __init__(self, files: list[InputFile], image_column: str = "image", caption_column: str = "caption",
                 key_column: str | None = None):
        self.files, self.image_column, self.caption_column, self.key_column = (
            files, image_column, caption_column, key_column)

    def units(self) -> list[tuple[InputFile, int, int, int]]:
        out = []
        for f in self.files:
            md = _parquet_meta(f, [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else []))
            offset = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                out.append((f, rg, offset, n))
                offset += n
        return out

    def records(self, units: Sequence[tuple]) -> Iterator[ImageRecord]:
        import pyarrow.parquet as pq

        cols = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])
        for f, rg, offset, _ in units:
            with f.open() as fh:
                table = pq.ParquetFile(fh).read_row_group(rg, columns=cols)
            images = table.column(self.image_column).to_pylist()
            captions = table.column(self.caption_column).to_pylist()
            keys = table.column(self.key_column).to_pylist() if self.key_column else [None] * len(images)
            for i, (img, cap, key) in enumerate(zip(images, captions, keys)):
                key = str(key) if key is not None else f"{f.name}:{offset + i}"
                if isinstance(img, dict):  # Hugging Face `Image` feature: {"bytes", "path"}
                    img = img.get("bytes")
                if isinstance(cap, bytes):
                    cap = _decode_or_none(cap)
                if img is None:
                    yield ImageRecord(key, cap, None, MISSING_IMAGE)
                else:
                    yield ImageRecord(key, cap, lambda b=img: b)

    def count(self, units: Sequence[tuple]) -> int:
        return sum(u[3] for u in units)


def image_source(inputs: Sequence[str], fmt: str = "auto", *, path_field: str = "path",
                 caption_field: str = "caption", key_field: str = "key", image_column: str = "image",
                 caption_column: str = "caption", key_column: str | None = None) -> ImageSource:
    """Build the reader for `inputs` (paths/globs/folders); `fmt` auto-detects from extensions."""
    if fmt == "auto":
        fmt = _detect(inputs)
    if fmt == "manifest":
        manifests = list_files(inputs, (".jsonl", ".csv"), recursive=False)  # a folder: its top-level manifests
        return ManifestSource(manifests, path_field, caption_field, key_field)
    if fmt == "tar":
        return TarSource(list_files(inputs, (".tar", ".tar.gz", ".tgz")), caption_field)
    if fmt == "parquet":
        return ParquetSource(list_files(inputs, (".parquet",)), image_column, caption_column, key_column)
    if fmt == "folder":
        if len(inputs) != 1:
            raise ValueError("--format folder takes exactly one folder")
        return FolderSource(inputs[0])
    raise ValueError(f"unknown input format {fmt!r}; use auto, manifest, tar, parquet or folder")


def _detect(inputs: Sequence[str]) -> str:
    exts = {".jsonl": "manifest", ".csv": "manifest", ".tar": "tar",
            ".tgz": "tar", ".gz": "tar", ".parquet": "parquet"}
    for kind_ext, kind in exts.items():
        if all(i.lower().rstrip("*").endswith(kind_ext) for i in inputs):
            return kind
    if len(inputs) == 1:
        fs, path = url_to_fs(inputs[0])
        if fs.isdir(path):
            names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
            for ext in (".jsonl", ".csv", ".tar", ".parquet"):
                if any(n.endswith(ext) for n in names):
                    return exts[ext]
            return "folder"
    raise ValueError(f"cannot tell the input format of {list(inputs)}; pass --format "
                     f"manifest|tar|parquet|folder")


# ----------------------------------------------------------------------------- text


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

    def units(self) -> list[tuple[InputFile, int]]:
        """Text files, or (file, row group) for parquet."""
        out = []
        for f in self.files:
            if f.path.endswith(".parquet"):
                out += [(f, rg) for rg in range(_parquet_meta(f, [self.text_field]).num_row_groups)]
            else:
                out.append((f, -1))
        return out

    def records(self, units: Sequence[tuple[InputFile, int]]) -> Iterator[TextRecord]:
        for f, rg in units:
            if rg >= 0:
                yield from self._parquet(f, rg)
            elif f.path.endswith((".jsonl", ".json")):
                yield from self._jsonl(f)
            else:
                yield from self._txt(f)

    def _txt(self, f: InputFile) -> Iterator[TextRecord]:
        data = f.fs.cat_file(f.path)
        if self.doc_split == "file":
            text = _decode_or_none(data)
            yield _text_record(f.name, text, BAD_UTF8 if text is None else None)
            return
        para: list[str] = []
        bad, n = False, 0
        for line in data.split(b"\n") + [b""]:
            if line.strip():
                s = _decode_or_none(line.rstrip(b"\r"))
                bad |= s is None
                para.append(s or "")
                continue
            if para:
                yield _text_record(f"{f.name}:{n}", "\n".join(para), BAD_UTF8 if bad else None)
                para, bad, n = [], False, n + 1

    def _jsonl(self, f: InputFile) -> Iterator[TextRecord]:
        for i, line in enumerate(f.fs.cat_file(f.path).split(b"\n")):
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
            yield _text_record(key, None if text is None else str(text), MISSING_TEXT if text is None else None)

    def _parquet(self, f: InputFile, rg: int) -> Iterator[TextRecord]:
        import pyarrow.parquet as pq

        with f.open() as fh:
            pf = pq.ParquetFile(fh)
            offset = sum(pf.metadata.row_group(i).num_rows for i in range(rg))
            values = pf.read_row_group(rg, columns=[self.text_field]).column(0).to_pylist()
        for i, v in enumerate(values):
            key = f"{f.name}:{offset + i}"
            if v is None:
                yield TextRecord(key, None, MISSING_TEXT)
            elif isinstance(v, bytes):
                s = _decode_or_none(v)
                yield _text_record(key, s, BAD_UTF8 if s is None else None)
            else:
                yield _text_record(key, str(v))

    def count(self, units: Sequence) -> int | None:
        return None


def text_source(inputs: Sequence[str], doc_split: str = "paragraph", text_field: str = "text") -> TextSource:
    """Reader over .txt/.md, .jsonl and .parquet files found in `inputs` (paths, globs, folders)."""
    return TextSource(list_files(inputs, (".txt", ".md", ".jsonl", ".json", ".parquet")), doc_split, text_field)


# ----------------------------------------------------------------------------- helpers


def _text_record(key: str, text: str | None, error: str | None = None) -> TextRecord:
    if error is None and (text is None or not text.strip()):
        error = EMPTY_TEXT
    return TextRecord(key, text, error)


def _wds_key(name: str) -> str:
    """WebDataset key of a member: its path up to the first dot of the file name."""
    d, b = posixpath.split(name)
    return posixpath.join(d, b.split(".", 1)[0])


def _decode_or_none(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parquet_meta(f: InputFile, columns: Sequence[str]):
    import pyarrow.parquet as pq

    with f.open() as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{f.path} has no column(s) {missing}; it has {sorted(names)} "
                         f"(set --image-column/--caption-column/--key-column/--text-field)")
    return pf.metadata
