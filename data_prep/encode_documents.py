"""Encode mixed-modal documents into MDS document shards: token ids per text part, VAE latent
distributions per image, a role per part (columns: `data_prep.schema`, the trainer's stream kind
`interleaved`).

Inputs (`data_prep.document_readers`), by `--format`:
- `interleaved`: OBELICS-style rows (`texts`/`images` lists, nulls marking the other modality) in
  JSONL or Parquet; texts are trained, images generated.
- `edit`: editing triples (`source`, `instruction`, `target`) in JSONL, CSV or Parquet; written as
  source (condition), instruction (context), target (generated).
Images are preprocessed and encoded exactly as `data_prep.encode_latents` does (same VAE, same
fixed, padded batches: a latent does not depend on which images share its batch); text parts are
tokenized without BOS/EOS (the trainer adds BOS/EOS around the document).

Bad inputs, counted by reason in the same report as the other tools (examples name the document
and part); a document never silently changes meaning:
- an edit triple with any bad part is skipped whole, the reason naming the part
  (`source_corrupt_image`, `target_too_small`, `instruction_empty`, ...): an edit without its
  source is not training data;
- an interleaved document with a bad image follows `--bad-image`: `drop_image` (default) writes
  the document without that image and counts it under `dropped_parts` by reason; `drop_document`
  skips the document, counted by the image's reason. Text that is not valid UTF-8 or cannot be
  tokenized skips the document (`bad_utf8`, `tokenize_error`); a whitespace-only text part is
  dropped and counted (`empty_text`);
- empty documents (`empty_document`), documents without any text (`no_text`), documents listing
  more than `--max-images` images (`too_many_images`), rows that are not a document
  (`malformed_document`, `bad_json`, `bad_utf8`) and damaged parquet files are skipped and counted.

    python -m data_prep.encode_documents --format edit --input edits.jsonl --out shards/edit \\
        --vae vae/ --tokenizer tok/tokenizer.model --resolution 256 [--rank R --world-size W]

With several workers, run `python -m data_prep.merge_index OUT` afterwards (one worker merges itself).
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from . import document_readers, images, readers
from .cli import local_abspath, parse_with_config, run_tool
from .encode_latents import NONFINITE, LatentEncoder, vae_settings
from .image_encoding import TOKENIZE_ERROR, _ordered_map, run_worker, setup_worker
from .schema import DOCUMENT_COLUMNS, document_row, latents_to_storage, storage_to_tensor
from .sharding import ShardJob, Stats, add_scaleout_args, partition
from .tokenizer import Tokenizer

log = logging.getLogger("data_prep.encode_documents")
NO_TEXT, TOO_MANY_IMAGES, EMPTY_TEXT = "no_text", "too_many_images", "empty_text"
BAD_IMAGE_RULES = ("drop_image", "drop_document")


@dataclass
class PendingDoc:
    """A document whose text passed every check; its images are decoded, then encoded in batches."""

    record: document_readers.DocumentRecord
    parts: list[list]  # [role, ids] or [role, part name, image bytes | pixels [3, R, R], orig (h, w)]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, part name) of dropped empty texts


class DocumentChunkEncoder:
    """The chunk processor: document records -> checked, tokenized text -> decoded images -> VAE
    latents in fixed batches -> document rows, with the bad-input rules of the module docstring."""

    def __init__(self, encoder: LatentEncoder, tokenizer: Tokenizer, shape: str, resolution: int, min_size: int,
                 latent_dtype: str, bad_image: str, max_images: int, decode_workers: int):
        if bad_image not in BAD_IMAGE_RULES:
            raise ValueError(f"--bad-image must be one of {BAD_IMAGE_RULES}, got {bad_image!r}")
        self.encoder, self.tokenizer, self.shape = encoder, tokenizer, shape
        self.resolution, self.min_size, self.latent_dtype = resolution, min_size, latent_dtype
        self.bad_image = "drop_document" if shape == "edit" else bad_image  # an edit is never kept without a part
        self.max_images = max_images
        self.pool = ThreadPoolExecutor(decode_workers) if decode_workers > 0 else None
        self.inflight = max(2 * encoder.batch_size, 4 * max(decode_workers, 1))

    def _reason(self, part: str, reason: str) -> str:
        """An edit's skip reasons name the part (source_corrupt_image); an interleaved one's do not."""
        if self.shape != "edit":
            return reason
        text = {readers.MISSING_CAPTION: "missing", readers.EMPTY_CAPTION: "empty", readers.CAPTION_TOO_LONG: "too_long"}
        return f"{part}_{text.get(reason, reason)}"

    def _checked(self, records: Iterator[document_readers.DocumentRecord], stats: Stats,
                 tick: Callable[[int], None]) -> Iterator[PendingDoc]:
        """Documents whose record, text and image count pass, texts tokenized, image bytes read."""
        for rec in records:
            reason, doc = self._check(rec)
            if reason is not None:
                stats.skip(reason, rec.label())
                tick(1)
                continue
            yield doc

    def _check(self, rec: document_readers.DocumentRecord) -> tuple[str | None, PendingDoc | None]:
        if rec.error:
            return rec.error, None
        if sum(p.is_image for p in rec.parts) > self.max_images:
            return TOO_MANY_IMAGES, None
        doc = PendingDoc(rec, [])
        for part in rec.parts:
            if part.is_image:
                doc.parts.append([part.role, part.name, part, None])
                continue
            problem = part.error or (readers.caption_problem(part.text) if self.shape == "edit" else None)
            if problem is None and not (part.text or "").strip():
                doc.dropped.append((EMPTY_TEXT, part.name))
                continue
            if problem is not None:
                return self._reason(part.name, problem), None
            try:
                ids = self.tokenizer.encode(part.text.strip())
            except Exception as e:  # noqa: BLE001 - one text sentencepiece rejects must not stop the job
                log.warning("%s %s: not tokenizable (%s: %s)", rec.label(), part.name, type(e).__name__, e)
                return self._reason(part.name, TOKENIZE_ERROR), None
            doc.parts.append([part.role, ids])
        if not any(len(p) == 2 for p in doc.parts):
            return NO_TEXT, None
        for p in doc.parts:  # read in stream order, in this thread: file handles are not shared
            if len(p) == 4:
                part = p[2]
                if part.error:
                    p[2] = part.error
                    continue
                try:
                    p[2] = part.read()
                except Exception as e:  # noqa: BLE001 - missing file, permission, network
                    log.debug("%s %s unreadable: %s", rec.label(), part.name, e)
                    p[2] = images.UNREADABLE
        return None, doc

    def _decode(self, doc: PendingDoc) -> list[tuple[torch.Tensor, tuple[int, int]] | str]:
        """Pixels and original size of each image of `doc`, or the reason it is unusable (in a pool thread)."""
        out = []
        for p in doc.parts:
            if len(p) != 4:
                continue
            if isinstance(p[2], str):
                out.append(p[2])
                continue
            try:
                out.append(images.load_image(p[2], self.resolution, self.min_size))
            except images.BadImage as e:
                out.append(e.reason)
            except Exception as e:  # noqa: BLE001 - an image that breaks preprocessing must not stop the job
                log.warning("%s %s: unexpected %s while preprocessing: %s", doc.record.label(), p[1], type(e).__name__, e)
                out.append(images.CORRUPT)
        return out

    def _apply_rule(self, doc: PendingDoc, results: Sequence, stats: Stats) -> PendingDoc | None:
        """Give each image its result (what follows the image's bytes in its part: (pixels, orig) once
        decoded, ((mean, std), orig) once encoded) or a reason: the image is dropped, or the
        document skipped (counted here)."""
        kept, bad = [], None
        images_ = iter(results)
        for p in doc.parts:
            if len(p) != 4:
                kept.append(p)
                continue
            r = next(images_)
            if not isinstance(r, str):
                p[2], p[3] = r
                kept.append(p)
            elif self.bad_image == "drop_document":
                bad = bad or self._reason(p[1], r)
            else:
                doc.dropped.append((r, p[1]))
        if bad is not None:
            stats.skip(bad, doc.record.label())
            return None
        doc.parts = kept
        return doc

    def __call__(self, records: Iterator[document_readers.DocumentRecord], writer: Any, stats: Stats,
                 tick: Callable[[int], None]) -> None:
        pending: list[PendingDoc] = []
        for doc, fut in _ordered_map(self._decode, self._checked(records, stats, tick), self.pool, self.inflight):
            doc = self._apply_rule(doc, fut.result(), stats)
            if doc is None:
                tick(1)
                continue
            pending.append(doc)
            if sum(len(p) == 4 for d in pending for p in d.parts) >= self.encoder.batch_size:
                self._flush(pending, writer, stats, tick)
                pending = []
        if pending:
            self._flush(pending, writer, stats, tick)

    def _flush(self, docs: list[PendingDoc], writer: Any, stats: Stats, tick: Callable[[int], None]) -> None:
        """Encode every image of `docs` in fixed batches, then write the documents in order."""
        pixels = [p[2] for d in docs for p in d.parts if len(p) == 4]
        b = self.encoder.batch_size
        encoded = [self.encoder(torch.stack(pixels[i: i + b])) for i in range(0, len(pixels), b)]
        means = torch.cat([m for m, _ in encoded]) if encoded else None  # [n, C, h, w]
        stds = torch.cat([s for _, s in encoded]) if encoded else None
        at = 0
        for d in docs:
            results = []
            for p in d.parts:
                if len(p) != 4:
                    continue
                mean, std = means[at], stds[at]
                at += 1
                finite = all(storage_to_tensor(latents_to_storage(x, self.latent_dtype)).isfinite().all()
                             for x in (mean, std))
                results.append(((mean, std), p[3]) if finite else NONFINITE)  # e.g. fp16 overflow of a degenerate image
            tick(1)
            if self._apply_rule(d, results, stats) is None:
                continue
            for reason, name in d.dropped:
                stats.drop(reason, f"{d.record.label()} {name}")
            parts = [(p[0], p[1]) if len(p) == 2 else (p[0], *p[2], p[3]) for p in d.parts]
            writer.write(document_row(d.record.key, parts, self.latent_dtype))
            stats.written += 1
            stats.renamed += d.record.renamed


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of option: value defaults")
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--input", nargs="+", required=True, help="JSONL/CSV/Parquet files, globs or folders")
    io.add_argument("--format", required=True, choices=list(document_readers.FORMATS),
                    help="interleaved: texts/images lists per row; edit: source/instruction/target per row")
    io.add_argument("--out", required=True, help="output folder (gets one part-<rank>/ sub-folder per worker)")
    io.add_argument("--vae", required=True, help="AutoencoderKL folder written by save_pretrained")
    io.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a diffusers pipeline folder")
    io.add_argument("--tokenizer", required=True, help="sentencepiece .model with our special tokens")
    io.add_argument("--texts-field", default="texts", help="interleaved: the column/field with the texts list")
    io.add_argument("--images-field", default="images", help="interleaved: the column/field with the images list")
    io.add_argument("--source-field", default="source", help="edit: the source image (path, bytes or {bytes, path})")
    io.add_argument("--instruction-field", default="instruction", help="edit: the instruction text")
    io.add_argument("--target-field", default="target", help="edit: the edited image")
    io.add_argument("--key-field", default=None, help="optional field/column with a unique document key")
    pp = ap.add_argument_group("processing")
    pp.add_argument("--resolution", type=int, default=256, help="square side after resize + center crop")
    pp.add_argument("--min-size", type=int, default=None,
                    help="images whose short side is below this are bad (default: resolution/2)")
    pp.add_argument("--bad-image", default="drop_image", choices=list(BAD_IMAGE_RULES),
                    help="interleaved: what a bad image costs (edit triples are always skipped whole)")
    pp.add_argument("--max-images", type=int, default=8, help="documents listing more images are skipped")
    pp.add_argument("--batch-size", type=int, default=None,
                    help="VAE batch, fixed (part of the output's identity); default 32 on CUDA, 4 on CPU")
    pp.add_argument("--latent-dtype", default="float16", choices=["float16", "bfloat16"])
    pp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pp.add_argument("--decode-workers", type=int, default=2, help="threads decoding images (0: inline)")
    pp.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sc = ap.add_argument_group("scale-out and resume")
    add_scaleout_args(sc, 1024, "documents per resumable chunk (one MDS sub-folder)", "MDS compression, e.g. zstd")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns this worker's report."""
    args = parse_with_config(build_parser(), argv)
    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    rank, world, min_size, tokenizer = setup_worker(args)
    encoder = LatentEncoder(args.vae, args.batch_size, args.device, args.vae_subfolder)
    fields = {"texts_field": args.texts_field, "images_field": args.images_field, "source_field": args.source_field,
              "instruction_field": args.instruction_field, "target_field": args.target_field,
              "key_field": args.key_field}
    source = document_readers.document_source(args.input, args.format, **fields)
    all_units = source.units()
    units = partition(all_units, rank, world)
    settings = {
        "kind": "document", "format": args.format, "inputs": [local_abspath(i) for i in args.input], "fields": fields,
        "resolution": args.resolution, "min_size": min_size, "batch_size": args.batch_size,
        "bad_image": args.bad_image, "max_images": args.max_images, **vae_settings(args, encoder),
        "device": encoder.device.type, "tokenizer": local_abspath(args.tokenizer),
        "special_tokens": tokenizer.special_tokens(), "vocab_size": tokenizer.vocab_size, "text_ids": "no BOS/EOS",
    }
    log.info("worker %d/%d: %d of %d input units; %s documents, latents %s %s; VAE on %s", rank, world, len(units),
             len(all_units), args.format, tuple(settings["latent_shape"]), args.latent_dtype, encoder.device)
    job = ShardJob(args.out, rank, world, args.chunk_size, DOCUMENT_COLUMNS, settings,
                   size_limit=args.shard_size_limit, compression=args.compression,
                   overwrite=args.overwrite, throttle=args.throttle)
    process = DocumentChunkEncoder(encoder, tokenizer, args.format, args.resolution, min_size, args.latent_dtype,
                                   args.bad_image, args.max_images, args.decode_workers)
    return run_worker(job, source, units, process, "doc", args)


def cli() -> None:
    """Console entry point (`transfusion-encode-documents`): errors a user must fix print as one line."""
    run_tool(main, "encode_documents")


if __name__ == "__main__":
    cli()
