"""The MDS shard schema: the one place that says what a prepared sample holds.

Image-caption shards (written by `data_prep.encode_latents`):

| column        | MDS encoding              | meaning                                                |
|---------------|---------------------------|--------------------------------------------------------|
| `key`         | `str`                     | source key (manifest key/path, tar key, parquet row)   |
| `caption`     | `str`                     | caption text, whitespace-stripped                      |
| `caption_ids` | `ndarray:int32`           | sentencepiece ids of the caption, **no BOS/EOS**: the  |
|               |                           | trainer adds BOS/EOS/BOI/EOI when it builds documents  |
| `latent_mean` | `ndarray:<dt>:C,h,w`      | mean of the VAE posterior, scaled: (mean - shift)·scale |
| `latent_std`  | `ndarray:<dt>:C,h,w`      | std of the VAE posterior, scaled: std·scale            |
| `orig_size`   | `ndarray:int32:2`         | original image [height, width] before resize/crop      |

`<dt>` is `float16` by default, or `uint16` holding bfloat16 bit patterns (MDS has no bf16 type):
a uint16 latent column always means bf16. The shape is fixed per dataset (it is in the column
encoding), so every sample of a dataset has the same latent shape.

Why mean + std: the trainer draws `z = mean + std · ε` per step (the paper samples the posterior),
which equals `(vae_sample - shift) · scale`; storing std rather than logvar keeps the draw a single
fused multiply-add and fp16 holds it well (std·scale is O(0.01..1)). Use `mean` alone for a
deterministic latent.

Text shards (written by `data_prep.tokenize_text`):

| column   | MDS encoding    | meaning                                  |
|----------|-----------------|------------------------------------------|
| `key`    | `str`           | source key (file:document or file:line)  |
| `tokens` | `ndarray:int32` | BOS + ids + EOS of one document          |

Shards are read by schema: `check_index` refuses a shard set (its index.json) holding any column
or encoding not in the tables above, before a sample is decoded. MDS can store `pkl` columns,
and reading one unpickles whatever the file says, i.e. runs code chosen by whoever wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

LATENT_STORAGE: dict[str, str] = {"float16": "float16", "bfloat16": "uint16"}
TEXT_COLUMNS: dict[str, str] = {"key": "str", "tokens": "ndarray:int32"}


def image_columns(latent_shape: Sequence[int], latent_dtype: str = "float16") -> dict[str, str]:
    """MDS columns of image-caption shards for latents of shape (C, h, w) stored as `latent_dtype`."""
    if latent_dtype not in LATENT_STORAGE:
        raise ValueError(f"latent dtype must be one of {sorted(LATENT_STORAGE)}, got {latent_dtype!r}")
    shape = ",".join(str(int(s)) for s in latent_shape)
    latent = f"ndarray:{LATENT_STORAGE[latent_dtype]}:{shape}"
    return {
        "key": "str",
        "caption": "str",
        "caption_ids": "ndarray:int32",
        "latent_mean": latent,
        "latent_std": latent,
        "orig_size": "ndarray:int32:2",
    }


# Allowed encodings per column name (any latent shape); a shard set's kind follows from its names.
_LATENT = re.compile(r"ndarray:(float16|uint16):\d+,\d+,\d+")
_ENCODINGS: dict[str, re.Pattern] = {name: re.compile(re.escape(enc)) for name, enc in
                                     {**image_columns((1, 1, 1)), **TEXT_COLUMNS}.items()}
_ENCODINGS["latent_mean"] = _ENCODINGS["latent_std"] = _LATENT
# Image-token shards (data_prep.encode_vq_tokens, the discrete-image baseline): key, caption and
# caption_ids as in image shards, and `image_tokens`: the VQ code indices of the image, row-major
# over the code grid (0 .. codebook_size-1; the trainer adds model.image_token_offset).
IMAGE_TOKEN_COLUMNS: dict[str, str] = {"key": "str", "caption": "str", "caption_ids": "ndarray:int32",
                                       "image_tokens": "ndarray:int32"}
_ENCODINGS["image_tokens"] = re.compile(re.escape(IMAGE_TOKEN_COLUMNS["image_tokens"]))
KIND_COLUMNS: dict[str, frozenset[str]] = {
    "image": frozenset(image_columns((1, 1, 1))), "text": frozenset(TEXT_COLUMNS),
    "image_tokens": frozenset(IMAGE_TOKEN_COLUMNS)}


class SchemaError(ValueError):
    """A shard set whose columns are not ours; the message is one line naming the set and column."""


def check_index(path: str | Path, kind: str | None = None) -> str:
    """Refuse (SchemaError) a shard set with any column or encoding outside this schema; its kind.

    `path` is a shard folder or its index.json; `kind` ('image' or 'text') also requires that
    kind. Reads only the index, so nothing in a shard is decoded before the check passes.
    """
    index = Path(path)
    index = index / "index.json" if index.is_dir() else index
    where = f"shard set {index.parent}"
    try:
        shards = json.loads(index.read_text())["shards"]
        if not isinstance(shards, list):
            raise TypeError("'shards' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"{where}: cannot read {index.name} ({type(e).__name__}: {e})") from None
    kinds = set()
    for i, shard in enumerate(shards):
        shard = shard if isinstance(shard, dict) else {}
        names, encodings = shard.get("column_names"), shard.get("column_encodings")
        if shard.get("format") != "mds" or not isinstance(names, list) or not isinstance(encodings, list) \
                or len(names) != len(encodings):
            raise SchemaError(f"{where}: shard {i} is not an MDS shard with column names and encodings")
        for name, enc in zip(names, encodings):
            if name not in _ENCODINGS:
                raise SchemaError(f"{where}: unexpected column {name!r} (encoding {enc!r}); refusing to read it "
                                  f"(allowed columns: data_prep/schema.py)")
            if not isinstance(enc, str) or not _ENCODINGS[name].fullmatch(enc):
                why = " (pkl would unpickle, i.e. run, whatever the file holds)" if enc == "pkl" else ""
                raise SchemaError(f"{where}: column {name!r} has encoding {enc!r}, not the one in "
                                  f"data_prep/schema.py; refusing to read it{why}")
        got = [k for k, cols in KIND_COLUMNS.items() if set(names) == cols]
        if not got:
            raise SchemaError(f"{where}: shard {i} has columns {sorted(names)}, neither the image-caption "
                              f"{sorted(KIND_COLUMNS['image'])} nor the text {sorted(KIND_COLUMNS['text'])} set")
        kinds.add(got[0])
    if len(kinds) > 1:
        raise SchemaError(f"{where}: mixes image and text shards")
    found = kinds.pop() if kinds else None
    if kind is not None and found is not None and found != kind:
        raise SchemaError(f"{where}: holds {found} shards, but it is configured as a stream of kind {kind!r}")
    return found or "empty"


def latents_to_storage(x: torch.Tensor, latent_dtype: str = "float16") -> np.ndarray:
    """fp32 latents [N, C, h, w] -> numpy array in the stored dtype (bf16 as uint16 bit patterns)."""
    if latent_dtype == "float16":
        return x.detach().to("cpu", torch.float16).numpy()
    if latent_dtype == "bfloat16":
        return x.detach().to("cpu", torch.bfloat16).view(torch.uint16).numpy()
    raise ValueError(f"latent dtype must be one of {sorted(LATENT_STORAGE)}, got {latent_dtype!r}")


def storage_to_tensor(a: np.ndarray) -> torch.Tensor:
    """Stored latent array -> tensor in its true dtype (uint16 is read as bf16, see module doc)."""
    t = torch.from_numpy(np.array(a))  # copy: read-back arrays are read-only views of the shard
    if t.dtype == torch.uint16:
        return t.view(torch.bfloat16)
    return t


def sample_latents(
    sample: Mapping[str, Any], dtype: torch.dtype | None = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A read-back sample dict -> (mean, std), each [C, h, w], cast to `dtype` (None: as stored)."""
    mean = storage_to_tensor(sample["latent_mean"])
    std = storage_to_tensor(sample["latent_std"])
    if dtype is not None:
        mean, std = mean.to(dtype), std.to(dtype)
    return mean, std


def draw_latent(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw from the stored posterior: mean + std * eps (same shape as mean)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + std * eps
