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

Document shards (written by `data_prep.encode_documents`): mixed-modal documents, an ordered list
of parts, each text or one image, with a role per part (the trainer's stream kind `interleaved`):

| column         | MDS encoding    | meaning                                                         |
|----------------|-----------------|-----------------------------------------------------------------|
| `key`          | `str`           | source key (file:line / file:row, or the key column)            |
| `parts`        | `ndarray:int32` | [n_parts, 6], in document order: role, then for text (n_ids, 0, |
|                |                 | 0, 0, 0) and for an image (C, h, w, orig_height, orig_width)    |
| `text_ids`     | `ndarray:int32` | the ids of every text part, concatenated in order, no BOS/EOS   |
| `latent_dtype` | `str`           | `float16` or `bfloat16`: the element type of the latent bytes   |
| `latent_mean`  | `bytes`         | every image's scaled posterior mean, C·h·w values per image in  |
|                |                 | order, little-endian (bf16 as its bit pattern); empty: no image |
| `latent_std`   | `bytes`         | the same for the std                                            |

Roles (`ROLES`): `text` (LM loss), `context` (text read, not learned: no LM targets), `generate`
(image noised, diffusion loss), `condition` (image read clean at t = 0, no loss). Each image
records its own latent shape, so images of other sizes fit the format unchanged; the latents are
bytes because MDS refuses an empty ndarray, and a document may hold no image.

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


# Image-token shards (data_prep.encode_vq_tokens, the discrete-image baseline): key, caption and
# caption_ids as in image shards, and `image_tokens`: the VQ code indices of the image, row-major
# over the code grid (0 .. codebook_size-1; the trainer adds model.image_token_offset).
IMAGE_TOKEN_COLUMNS: dict[str, str] = {"key": "str", "caption": "str", "caption_ids": "ndarray:int32",
                                       "image_tokens": "ndarray:int32"}
DOCUMENT_COLUMNS: dict[str, str] = {"key": "str", "parts": "ndarray:int32", "text_ids": "ndarray:int32",
                                    "latent_dtype": "str", "latent_mean": "bytes", "latent_std": "bytes"}
ROLES: tuple[str, ...] = ("text", "context", "generate", "condition")  # a part's role code is its index
TEXT_ROLES, IMAGE_ROLES = ("text", "context"), ("generate", "condition")
PART_FIELDS = 6  # columns of `parts`

# Allowed encodings per column, per kind of shard set (any latent shape); a set's kind follows
# from its column names.
_LATENT = re.compile(r"ndarray:(float16|uint16):\d+,\d+,\d+")


def _exact(columns: dict[str, str]) -> dict[str, re.Pattern]:
    return {name: re.compile(re.escape(enc)) for name, enc in columns.items()}


_KIND_ENCODINGS: dict[str, dict[str, re.Pattern]] = {
    "image": {**_exact(image_columns((1, 1, 1))), "latent_mean": _LATENT, "latent_std": _LATENT},
    "text": _exact(TEXT_COLUMNS), "image_tokens": _exact(IMAGE_TOKEN_COLUMNS),
    "interleaved": _exact(DOCUMENT_COLUMNS)}
KIND_COLUMNS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in _KIND_ENCODINGS.items()}
_ALL_COLUMNS = frozenset().union(*KIND_COLUMNS.values())


class SchemaError(ValueError):
    """A shard set whose columns are not ours; the message is one line naming the set and column."""


def check_index(path: str | Path, kind: str | None = None) -> str:
    """Refuse (SchemaError) a shard set with any column or encoding outside this schema; its kind.

    `path` is a shard folder or its index.json; `kind` (a key of KIND_COLUMNS) also requires that
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
            if name not in _ALL_COLUMNS:
                raise SchemaError(f"{where}: unexpected column {name!r} (encoding {enc!r}); refusing to read it "
                                  f"(allowed columns: data_prep/schema.py)")
        got = [k for k, cols in KIND_COLUMNS.items() if set(names) == cols]
        if not got:
            raise SchemaError(f"{where}: shard {i} has columns {sorted(names)}, which are no kind's set: "
                              + "; ".join(f"{k} {sorted(c)}" for k, c in KIND_COLUMNS.items()))
        for name, enc in zip(names, encodings):
            if not isinstance(enc, str) or not _KIND_ENCODINGS[got[0]][name].fullmatch(enc):
                why = " (pkl would unpickle, i.e. run, whatever the file holds)" if enc == "pkl" else ""
                raise SchemaError(f"{where}: column {name!r} has encoding {enc!r}, not the one in "
                                  f"data_prep/schema.py; refusing to read it{why}")
        kinds.add(got[0])
    if len(kinds) > 1:
        raise SchemaError(f"{where}: mixes shards of kinds {sorted(kinds)}")
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


def latent_bytes(x: torch.Tensor, latent_dtype: str) -> bytes:
    """One image's fp32 latent [C, h, w] as the little-endian bytes of a document shard."""
    return latents_to_storage(x, latent_dtype).astype(np.dtype(np.float16 if latent_dtype == "float16" else np.uint16)
                                                      .newbyteorder("<"), copy=False).tobytes()


def document_row(key: str, parts: Sequence[tuple], latent_dtype: str = "float16") -> dict[str, Any]:
    """A document as a shard row. `parts` in order: (role, ids) for text, (role, mean, std, (orig_h,
    orig_w)) for an image, with ids a 1-D int sequence and mean/std fp32 tensors [C, h, w]."""
    table, ids, means, stds = [], [], [], []
    for role, *value in parts:
        code = ROLES.index(role)
        if role in TEXT_ROLES:
            ids.append(np.asarray(value[0], dtype=np.int32))
            table.append([code, len(ids[-1]), 0, 0, 0, 0])
        else:
            mean, std, orig = value
            table.append([code, *mean.shape, *orig])
            means.append(latent_bytes(mean, latent_dtype))
            stds.append(latent_bytes(std, latent_dtype))
    return {"key": key, "parts": np.asarray(table, dtype=np.int32).reshape(-1, PART_FIELDS),
            "text_ids": np.concatenate(ids) if ids else np.zeros(0, np.int32), "latent_dtype": latent_dtype,
            "latent_mean": b"".join(means), "latent_std": b"".join(stds)}


def document_parts(sample: Mapping[str, Any]) -> list[tuple]:
    """A read-back document row -> its parts in order: (role, ids int64 [n]) for text, (role, mean,
    std) for an image (fp32 tensors [C, h, w]). A row whose columns disagree is a ValueError naming it."""
    table = np.asarray(sample["parts"]).reshape(-1, PART_FIELDS)
    ids, dtype = np.asarray(sample["text_ids"], dtype=np.int64), sample["latent_dtype"]
    if dtype not in LATENT_STORAGE:
        raise ValueError(f"document {sample['key']}: latent_dtype {dtype!r} is not one of {sorted(LATENT_STORAGE)}")
    stored = np.dtype(np.float16 if dtype == "float16" else np.uint16).newbyteorder("<")
    means = np.frombuffer(sample["latent_mean"], dtype=stored)
    stds = np.frombuffer(sample["latent_std"], dtype=stored)
    out, at_id, at_latent = [], 0, 0
    for code, *f in table.tolist():
        if not 0 <= code < len(ROLES):
            raise ValueError(f"document {sample['key']}: part role code {code} is not one of 0..{len(ROLES) - 1}")
        role = ROLES[code]
        if role in TEXT_ROLES:
            out.append((role, ids[at_id: at_id + f[0]]))
            at_id += f[0]
            continue
        shape = tuple(f[:3])
        n = int(np.prod(shape))
        mean = storage_to_tensor(means[at_latent: at_latent + n].astype(stored.newbyteorder("="))).reshape(shape)
        std = storage_to_tensor(stds[at_latent: at_latent + n].astype(stored.newbyteorder("="))).reshape(shape)
        out.append((role, mean.float(), std.float()))
        at_latent += n
    if at_id != len(ids) or at_latent != len(means) or len(stds) != len(means):
        raise ValueError(f"document {sample['key']}: its parts table covers {at_id} text ids and {at_latent} latent "
                         f"values but the row holds {len(ids)} and {len(means)}/{len(stds)}")
    return out
