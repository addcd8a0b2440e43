"""What inference.evaluate scores: prompts, reference images and texts from a JSON-lines manifest.

One row per line, paths relative to the manifest's folder:

    {"caption": "a red bus", "label": 3}              a caption -> image prompt ("label": its class, for accuracy)
    {"image": "a.png", "references": ["...", "..."]}  a reference image (FID / FD statistics) and an image ->
                                                      caption prompt scored against its references (CIDEr, BLEU)
    {"image": "b.png", "caption": "a dog"}            both at once (COCO style: references default to [caption])
    {"text": "..."}                                   a held-out text document (perplexity)

Sharding is by index: rank r of W takes items r, r + W, ... of each list, so every item is scored
exactly once whatever the world size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

T = TypeVar("T")


class ManifestError(ValueError):
    """A manifest row the evaluation cannot use; the message names the file and line."""


@dataclass
class Prompt:
    caption: str
    label: int | None = None


@dataclass
class Reference:
    image: Path
    references: list[str] = field(default_factory=list)
    label: int | None = None


@dataclass
class EvalSet:
    prompts: list[Prompt] = field(default_factory=list)
    images: list[Reference] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

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


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """(global index, item) of this rank's share: items rank, rank + world, ..."""
    return [(i, items[i]) for i in range(rank, len(items), world)]
