"""Input readers for image-caption records (text documents: `data_prep.text_readers`), local or fsspec.

A reader lists cheap, deterministic *units* (manifest lines, tar files, parquet row groups, text
files); workers partition the unit list, then stream records from their units in order. Paths go
through fsspec, so `s3://`/`gs://` inputs work where the matching fsspec backend is installed.

Nothing is dropped silently and no single input stops the job: a malformed record (bad manifest
line, caption or text that is not valid UTF-8, malformed JSON) becomes a record carrying a reason
that the job counts and skips, and a damaged container (a tar cut short, a parquet file without
its footer, an unreadable row group) becomes a record named after the file (or one per lost row),
after the records read before the damage. Locations (`file:N`) are 1-based line numbers for
JSONL/CSV/text files and 1-based row numbers for Parquet; keys made from positions use the same
numbers.

Duplicate keys, one rule for every format: within one worker's stream of records, in input order,
the first record with a key keeps it and the n-th repeat becomes `key#n` (see `unique_keys`).
Manifests are listed whole at start-up, so their numbering runs over all manifest lines and never
depends on the number of workers; tar keys can only repeat inside one tar (a unit is never split);
parquet keys from `--key-column` are numbered within each worker's partition.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from fsspec.core import url_to_fs

log = logging.getLogger("data_prep.readers")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# Longer captions are skipped in every format (the limit equals the csv module's default field limit).
MAX_CAPTION_CHARS = 131_072
# Record-level skip reasons.
BAD_MANIFEST_LINE = "bad_manifest_line"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_LONG = "caption_too_long"
MISSING_IMAGE = "missing_image"
BAD_UTF8 = "bad_utf8"
BAD_JSON = "bad_json"
UNREADABLE = "unreadable"  # the same reason as images.UNREADABLE
# Damaged containers: counted once per file (named by it), or once per lost parquet row.
TRUNCATED_TAR = "truncated_tar"
CORRUPT_TAR = "corrupt_tar"
TRUNCATED_PARQUET = "truncated_parquet"
CORRUPT_PARQUET = "corrupt_parquet"
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


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
    where: str | None = None  # 1-based location (file:line) when the key does not say it
    renamed: bool = False  # the key got a `#n` suffix under the duplicate-key rule

    def label(self) -> str:
        """How reports name this record: the key, plus its location when that differs."""
        return self.key if not self.where or self.where == self.key else f"{self.key} ({self.where})"


class ImageSource(abc.ABC):
    """Base of image-caption readers: `units()` to partition, `stream(units)` to consume."""

    @abc.abstractmethod
    def units(self) -> list:
        """The work units (files, tar members, row groups) that workers partition."""

    @abc.abstractmethod
    def records(self, units: Sequence) -> Iterator[ImageRecord]:
        """Stream the records of `units`, in order (keys as found in the input)."""

    def stream(self, units: Sequence) -> Iterator[ImageRecord]:
        """The records of `units` under the duplicate-key rule: what the encoders consume."""
        return unique_keys(self.records(units))

    def count(self, units: Sequence) -> int | None:
        """Number of records in `units` if known without reading them (for the progress bar)."""
        return None


class KeyRenamer:
    """Gives each key seen again a `#n` suffix (n-th repeat), never reusing a key already given."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.repeats: dict[str, int] = {}

    def __call__(self, key: str) -> str:
        if key not in self.seen:
            self.seen.add(key)
            return key
        n = self.repeats.get(key, 0) + 1
        while f"{key}#{n}" in self.seen:  # a real key of that form came first
            n += 1
        self.repeats[key] = n
        self.seen.add(f"{key}#{n}")
        return f"{key}#{n}"


def unique_keys(records: Iterable[ImageRecord]) -> Iterator[ImageRecord]:
    """Apply the duplicate-key rule to a worker's record stream (deterministic: input order only)."""
    rename = KeyRenamer()
    for rec in records:
        key = rename(rec.key)
        if key != rec.key:
            rec.key, rec.renamed = key, True
        yield rec


class _ManifestEntry(NamedTuple):
    key: str
    fs: Any
    path: str | None
    caption: str | None
    error: str | None
    where: str
    renamed: bool


class ManifestSource(ImageSource):
    """JSONL or CSV manifests with a path and a caption per line (paths relative to the manifest).

    Keys: the `key_field` if present, else the path; a key listed again (several captions for one
    image) gets `#1`, `#2`, ... over all manifests, so keys stay unique whatever the worker count.
    """

    def __init__(self, files: list[InputFile], path_field: str = "path", caption_field: str = "caption",
                 key_field: str = "key"):
        self.files, self.path_field, self.caption_field, self.key_field = files, path_field, caption_field, key_field

    def units(self) -> list[_ManifestEntry]:
        entries, rename = [], KeyRenamer()
        for f in self.files:
            for line, row, reason in manifest_rows(f, self.path_field):
                where = f"{f.name}:{line}"
                path = row.get(self.path_field) if row else None
                if reason is None and (not path or not isinstance(path, str)):
                    reason = BAD_MANIFEST_LINE
                key = None if reason else str(row.get(self.key_field) or path)
                if reason is None and not (_is_utf8(path) and _is_utf8(key)):
                    reason = BAD_UTF8
                if reason:
                    entries.append(_ManifestEntry(where, None, None, None, reason, where, False))
                    continue
                unique = rename(key)  # same image listed with several captions
                caption, error = caption_text(row.get(self.caption_field))
                fs, p = f.sibling(path)
                entries.append(_ManifestEntry(unique, fs, p, caption, error, where, unique != key))
        if entries and all(e.error == BAD_MANIFEST_LINE for e in entries):
            raise ValueError(f"no manifest line in {[f.path for f in self.files]} has a '{self.path_field}' "
                             f"field; set --path-field/--caption-field")
        return entries

    def records(self, units: Sequence[_ManifestEntry]) -> Iterator[ImageRecord]:
        for e in units:
            read = (lambda fs=e.fs, path=e.path: fs.cat_file(path)) if e.fs is not None else None
            yield ImageRecord(e.key, e.caption, read, e.error, e.where, e.renamed)

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
            caption, error = None, None
            if txt in self.texts:
                try:
                    caption, error = caption_text(self.fs.cat_file(txt))
                except OSError:
                    error = UNREADABLE
            yield ImageRecord(f.name, caption, lambda f=f: f.fs.cat_file(f.path), error)

    def count(self, units: Sequence) -> int:
        return len(units)


class TarSource(ImageSource):
    """WebDataset-style tar shards: members sharing a key (name up to the first dot) form a sample.

    The image is the first member with an image extension; the caption is the `.txt` member, else
    the `caption_field` of the `.json` member. Keys are `<tar name without .tar>/<member key>`.
    A tar that ends without its end-of-archive block, or whose headers stop parsing, gives its
    samples up to the damage and then one `truncated_tar`/`corrupt_tar` record named after it.
    """

    def __init__(self, files: list[InputFile], caption_field: str = "caption"):
        self.files, self.caption_field = files, caption_field

    def units(self) -> list[InputFile]:
        return self.files

    def records(self, units: Sequence[InputFile]) -> Iterator[ImageRecord]:
        for f in units:
            yield from self._tar(f)

    def _tar(self, f: InputFile) -> Iterator[ImageRecord]:
        prefix = f.name[: -len(".tar")] if f.name.endswith(".tar") else f.name
        try:
            fh = f.open()
        except OSError as e:
            log.warning("%s: cannot open (%s); counted as %s", f.path, e, UNREADABLE)
            yield ImageRecord(f.name, None, None, UNREADABLE)
            return
        with fh:
            try:
                tf = tarfile.open(fileobj=fh, mode="r:*")
            except _TAR_ERRORS as e:
                yield self._damaged(f, _tar_reason(e), str(e), None)
                return
            with tf:
                group: list[tarfile.TarInfo] = []
                damage = None
                try:
                    for m in tf:
                        if not m.isfile():
                            continue
                        if group and _wds_key(m.name) != _wds_key(group[0].name):
                            yield self._record(tf, prefix, group)
                            group = []
                        group.append(m)
                    damage = _tar_end_damage(tf)
                except _TAR_ERRORS as e:
                    damage = (_tar_reason(e), str(e))
                last = None
                if group:  # the sample the damage may have cut is counted by what it lacks
                    last = self._record(tf, prefix, group)
                    yield last
                if damage:
                    yield self._damaged(f, *damage, last.key if last else None)

    @staticmethod
    def _damaged(f: InputFile, reason: str, detail: str, last_key: str | None) -> ImageRecord:
        where = f"after {last_key}" if last_key else "at its start"
        log.warning("%s: %s (%s) %s; the rest of the file is lost", f.path, reason, detail, where)
        return ImageRecord(f.name, None, None, reason, where)

    def _record(self, tf: tarfile.TarFile, prefix: str, group: list[tarfile.TarInfo]) -> ImageRecord:
        key = f"{prefix}/{_wds_key(group[0].name)}"
        by_ext = {m.name[len(_wds_key(m.name)):].lower(): m for m in group}
        image = next((m for ext, m in by_ext.items() if ext.endswith(IMAGE_EXTS)), None)
        caption, error = None, None
        try:
            if ".txt" in by_ext:
                caption, error = caption_text(tf.extractfile(by_ext[".txt"]).read())
            elif ".json" in by_ext:
                caption, error = self._json_caption(tf.extractfile(by_ext[".json"]).read())
        except _TAR_ERRORS:  # a caption member cut short; the container damage is reported after
            error = UNREADABLE
        if image is None:
            return ImageRecord(key, caption, None, error or MISSING_IMAGE)
        return ImageRecord(key, caption, lambda: tf.extractfile(image).read(), error)

    def _json_caption(self, data: bytes) -> tuple[str | None, str | None]:
        try:
            meta = json.loads(data)
        except UnicodeDecodeError:
            return None, BAD_UTF8
        except json.JSONDecodeError:
            return None, BAD_JSON
        if not isinstance(meta, dict):
            return None, BAD_JSON
        return caption_text(meta.get(self.caption_field))


class ParquetSource(ImageSource):
    """Parquet files with image bytes (binary, or a {bytes, path} struct) and a caption column.

    Keys: the `key_column` if given, else `<file>:<1-based row>`. A file whose metadata cannot be
    read is one `truncated_parquet`/`corrupt_parquet` record; a row group that cannot be read
    gives one `corrupt_parquet` record per row it holds.
    """

    def __init__(self, files: list[InputFile], image_column: str = "image", caption_column: str = "caption",
                 key_column: str | None = None):
        self.files, self.image_column, self.caption_column, self.key_column = (
            files, image_column, caption_column, key_column)

    def _columns(self) -> list[str]:
        return [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])

    def units(self) -> list[tuple[InputFile, int, int, int]]:
        """(file, row group, first row, rows); row group -1 marks a damaged file."""
        return parquet_units(self.files, self._columns())

    def records(self, units: Sequence[tuple]) -> Iterator[ImageRecord]:
        for f, rg, offset, n in units:
            if rg < 0:
                yield ImageRecord(f.name, None, None, parquet_damage(f))
                continue
            try:
                table = read_row_group(f, rg, self._columns())
            except (OSError, ValueError) as e:  # pyarrow's errors are OSError/ValueError subclasses
                log_lost_row_group(f, rg, n, e)
                for i in range(n):
                    yield ImageRecord(f"{f.name}:{offset + i + 1}", None, None, CORRUPT_PARQUET)
                continue
            images = table.column(self.image_column).to_pylist()
            captions = binary_values(table.column(self.caption_column))
            keys = binary_values(table.column(self.key_column)) if self.key_column else [None] * len(images)
            for i, (img, cap, key) in enumerate(zip(images, captions, keys)):
                where = f"{f.name}:{offset + i + 1}"
                if key is not None:
                    key = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
                if isinstance(img, dict):  # Hugging Face `Image` feature: {"bytes", "path"}
                    img = img.get("bytes")
                caption, error = caption_text(cap)
                read = None if img is None else (lambda b=img: b)
                yield ImageRecord(key or where, caption, read, error or (MISSING_IMAGE if img is None else None), where)

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


def caption_text(value: Any) -> tuple[str | None, str | None]:
    """A caption or text as found (str, bytes, None, number) -> (text, None), or (None, `bad_utf8`).

    Text holding lone surrogates (a JSON `\\udce9` escape, undecodable CSV bytes) is not valid
    UTF-8 either: the tokenizer cannot encode it and a shard could not store it.
    """
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError:
            return None, BAD_UTF8
    text = value if isinstance(value, str) else str(value)
    return (text, None) if _is_utf8(text) else (None, BAD_UTF8)


def caption_problem(caption: str | None) -> str | None:
    """Why a caption (as read, before stripping) cannot be used, or None."""
    if caption is None:
        return MISSING_CAPTION
    if not caption.strip():
        return EMPTY_CAPTION
    if len(caption.strip()) > MAX_CAPTION_CHARS:
        return CAPTION_TOO_LONG
    return None


# ----------------------------------------------------------------------------- helpers


def manifest_rows(f: InputFile, required: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(1-based line, row or None, reason the row is unusable or None) per non-blank line of a JSONL
    or CSV file; a CSV without the `required` column is a ValueError naming the file."""
    data = f.fs.cat_file(f.path)
    if f.path.lower().endswith(".csv"):
        yield from _csv_rows(f, data, required)
        return
    for i, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield i, None, BAD_UTF8
            continue
        except json.JSONDecodeError:
            yield i, None, BAD_MANIFEST_LINE
            continue
        yield (i, row, None) if isinstance(row, dict) else (i, None, BAD_MANIFEST_LINE)


def _csv_rows(f: InputFile, data: bytes, required: str) -> list[tuple[int, dict | None, str | None]]:
    text = data.decode("utf-8-sig", errors="surrogateescape")  # bad bytes -> lone surrogates, found below
    limit = csv.field_size_limit()
    # No field can be longer than the file: parse every row, then judge captions by our own limit.
    csv.field_size_limit(max(limit, len(text) + 1))
    rows: list[tuple[int, dict | None, str | None]] = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error:
                rows.append((start, None, BAD_MANIFEST_LINE))
                continue
            if not values:
                continue
            if header is None:
                header = values
                if required not in header:
                    raise ValueError(f"{f.path} has no '{required}' column (columns: {header}); "
                                     f"set the --*-field options")
                continue
            if not all(_is_utf8(v) for v in values):
                rows.append((start, None, BAD_UTF8))
                continue
            rows.append((start, dict(zip(header, values)), None))
    finally:
        csv.field_size_limit(limit)
    return rows


def _wds_key(name: str) -> str:
    """WebDataset key of a member: its path up to the first dot of the file name."""
    d, b = posixpath.split(name)
    return posixpath.join(d, b.split(".", 1)[0])


def _tar_reason(e: BaseException) -> str:
    """truncated_tar for an archive that ends early, corrupt_tar for anything else."""
    text = str(e).lower()
    cut = isinstance(e, EOFError) or "unexpected end" in text or "empty file" in text or "truncated" in text
    return TRUNCATED_TAR if cut else CORRUPT_TAR


def _tar_end_damage(tf: tarfile.TarFile) -> tuple[str, str] | None:
    """After tarfile stopped listing members: None at a real end-of-archive block, else the damage.

    tarfile ends its member list silently at a header cut short or one that does not parse, so a
    tar copied halfway would otherwise look complete.
    """
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except _TAR_ERRORS as e:
        return _tar_reason(e), str(e)
    if len(block) < tarfile.BLOCKSIZE:
        return TRUNCATED_TAR, f"unexpected end of data at byte {tf.offset}"
    if block.count(0) != tarfile.BLOCKSIZE:
        return CORRUPT_TAR, f"invalid member header at byte {tf.offset}"
    return None


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def binary_values(column: Any) -> list:
    """A parquet column as Python values, strings as raw bytes (pyarrow fails on invalid UTF-8)."""
    import pyarrow as pa

    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def read_row_group(f: InputFile, rg: int, columns: Sequence[str]) -> Any:
    import pyarrow.parquet as pq

    with f.open() as fh:
        return pq.ParquetFile(fh).read_row_group(rg, columns=list(columns))


def log_lost_row_group(f: InputFile, rg: int, n: int, e: Exception) -> None:
    log.warning("%s: row group %d unreadable (%s); its %d rows are counted as %s", f.path, rg, e, n,
                CORRUPT_PARQUET)


def parquet_units(files: Sequence[InputFile], columns: Sequence[str]) -> list[tuple[InputFile, int, int, int]]:
    """(file, row group, first row, rows) per row group; (file, -1, 0, 1) for a damaged file.

    A missing column is a setup error (wrong --*-column) and raised; a damaged file is counted,
    once, and the other files go on.
    """
    import pyarrow.parquet as pq

    out = []
    for f in files:
        try:
            with f.open() as fh:
                pf = pq.ParquetFile(fh)
                names, md = set(pf.schema_arrow.names), pf.metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            log.warning("%s: %s (%s); counted once, the other files go on", f.path, parquet_damage(f), e)
            out.append((f, -1, 0, 1))
            continue
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{f.path} has no column(s) {missing}; it has {sorted(names)} "
                             f"(set --image-column/--caption-column/--key-column/--text-field)")
        offset = 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            out.append((f, rg, offset, n))
            offset += n
    return out


def parquet_damage(f: InputFile) -> str:
    """truncated_parquet when the file starts like parquet but lacks its closing magic bytes."""
    try:
        size = f.fs.size(f.path)
        with f.open() as fh:
            head = fh.read(4)
            fh.seek(max(size - 4, 0))
            tail = fh.read(4)
    except OSError:
        return UNREADABLE
    return TRUNCATED_PARQUET if head == b"PAR1" and tail != b"PAR1" else CORRUPT_PARQUET
