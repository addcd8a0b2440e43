"""What inference.evaluate scores: prompts, reference images and texts from a JSON-lines manifest.

One row per line, paths relative to the manifest's folder:

    {"caption": "a red bus", "label": 3}              a caption -> image prompt ("label": its class, for accuracy)
    {"image": "a.png", "references": ["...", "..."]}  a reference image (FID / FD statistics) and an image ->
                                                      caption prompt scored against its references (CIDEr, BLEU)
    {"image": "b.png", "caption": "a dog"}            both at once (COCO style: references default to [caption])
    {"text": "..."}                                   a held-out text document (perplexity)

Or from held-out shards (`read_shards`, the shard sets data_prep writes and `eval.streams` reads):
an image-caption set gives each sample's caption as a prompt and its latent (posterior mean,
decoded by the model's VAE) as a reference image with the caption as its reference; a text set
gives its documents' token ids. Reference images from shards are VAE reconstructions, not the
original pixels: FID against them measures the model against what its VAE can represent.

Sharding is by index: rank r of W takes items r, r + W, ... of each list, so every item is scored
exactly once whatever the world size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


class ManifestError(ValueError):
    """A manifest row the evaluation cannot use; the message names the file and line."""


@dataclass
class Prompt:
    caption: str
    label: int | None = None


@dataclass
class Reference:
    """A reference image: a file, or a scaled latent [C, h, w] read from a shard (`source` names it)."""

    image: Path | None
    references: list[str] = field(default_factory=list)
    label: int | None = None
    latent: torch.Tensor | None = None
    source: Any = None  # what a cached statistic depends on for a shard sample: (index.json, sample index)


@dataclass
class EvalSet:
    prompts: list[Prompt] = field(default_factory=list)
    images: list[Reference] = field(default_factory=list)
    texts: list[str | list[int]] = field(default_factory=list)  # text, or token ids without BOS / EOS

    def extend(self, other: "EvalSet") -> "EvalSet":
        self.prompts += other.prompts
        self.images += other.images
        self.texts += other.texts
        return self

    @property
    def labelled(self) -> bool:
        return bool(self.prompts) and all(p.label is not None for p in self.prompts)

    @property
    def referenced(self) -> list[Reference]:
        return [r for r in self.images if r.references]


def read_manifest(path: str | Path) -> EvalSet:
    """Parse the manifest; a bad row is one ManifestError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"--manifest {path}: no such file")
    out = EvalSet()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(row, dict) or not {"caption", "image", "text"} & row.keys():
            raise ManifestError(f"{where} has none of 'caption', 'image', 'text'")
        label = row.get("label")
        if label is not None and not isinstance(label, int):
            raise ManifestError(f"{where}: 'label' must be an integer class id, got {label!r}")
        caption = row.get("caption")
        if caption is not None:
            out.prompts.append(Prompt(str(caption), label))
        if "image" in row:
            image = path.parent / str(row["image"])
            if not image.is_file():
                raise ManifestError(f"{where} names image {image}, which does not exist")
            refs = row.get("references", [caption] if caption is not None else [])
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise ManifestError(f"{where}: 'references' must be a list of captions")
            out.images.append(Reference(image, refs, label))
        if "text" in row:
            out.texts.append(str(row["text"]))
    if not (out.prompts or out.images or out.texts):
        raise ManifestError(f"{path} has no rows")
    return out


def read_shards(folder: str | Path, limit: int | None = None) -> EvalSet:
    """A held-out shard set (image-caption or text, by its schema) as prompts, references or texts."""
    from streaming import LocalDataset

    from data_prep.schema import SchemaError, check_index, sample_latents

    folder = Path(folder)
    try:
        kind = check_index(folder)
    except SchemaError as e:
        raise ManifestError(f"--shards {folder}: {e}") from None
    ds = LocalDataset(str(folder))
    n = len(ds) if limit is None else min(len(ds), limit)
    index = folder / "index.json"
    out = EvalSet()
    for i in range(n):
        sample = ds[i]
        if kind == "image":
            caption = str(sample["caption"])
            out.prompts.append(Prompt(caption))
            out.images.append(Reference(None, [caption], latent=sample_latents(sample)[0],
                                        source=[str(index.resolve()), index.stat().st_mtime_ns, i]))
        elif kind == "text":
            out.texts.append([int(t) for t in sample["tokens"][1:-1]])  # stored as BOS + ids + EOS
    if not (out.prompts or out.texts):
        raise ManifestError(f"--shards {folder} holds no samples")
    return out


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """(global index, item) of this rank's share: items rank, rank + world, ..."""
    return [(i, items[i]) for i in range(rank, len(items), world)]
