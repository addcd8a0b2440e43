"""What a checkpoint folder is, and its full model weights read offline (no process group, no engine);
and the safetensors folders weights are also kept in (inference folders, Hugging Face folders).

A complete checkpoint holds the trainer's `train_state.pt` and the model + optimizer state in one
engine's format: DCP (`.metadata` and shards, the torch engine) or DeepSpeed's partition files
(under `deepspeed/`). The converter (inference/convert.py) reads weights through here, so
converting a checkpoint never builds or imports a training engine.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from config import ConfigError
from parallel.engine import DCP, DEEPSPEED, EMA_KEY, MODEL_KEY

STATE_FILE = "train_state.pt"  # written by the checkpointer in every complete checkpoint
WEIGHTS_NAME = "model.safetensors"  # one file, or shards listed in the index (the Hugging Face layout)
INDEX_NAME = "model.safetensors.index.json"
ShapeCheck = Callable[[dict[str, tuple[int, ...]]], None]


def checkpoint_format(folder: Path) -> str | None:
    """DCP or DEEPSPEED for a complete checkpoint folder, None otherwise."""
    if not (folder / STATE_FILE).is_file():
        return None
    if (folder / ".metadata").is_file():
        return DCP
    if (folder / DEEPSPEED).is_dir():
        return DEEPSPEED
    return None


def read_full_weights(folder: Path, check: ShapeCheck | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint of either engine, with plain-model names (`ema`: the
    EMA weights of a run with train.ema_decay instead).

    `check` sees {name: shape} before any tensor is read (so a wrong checkpoint fails fast)."""
    fmt = checkpoint_format(folder)
    if fmt == DEEPSPEED:
        if ema:
            raise ConfigError(f"'{folder}' is a DeepSpeed checkpoint, which holds no EMA weights")
        return _read_deepspeed(folder, check)
    if fmt == DCP:
        return _read_dcp(folder, check, EMA_KEY if ema else MODEL_KEY)
    raise ConfigError(f"'{folder}' is not a complete checkpoint (needs {STATE_FILE} and DCP .metadata or a "
                      f"{DEEPSPEED}/ folder)")


def _read_dcp(folder: Path, check: ShapeCheck | None, key: str = MODEL_KEY) -> dict[str, torch.Tensor]:
    """The `key` tensors (model or EMA weights) of a DCP checkpoint, resharded by DCP into full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = key + "."
    stored = {k[len(prefix):]: v for k, v in metadata.items()
              if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not stored:
        why = " (it was trained with train.ema_decay=0)" if key == EMA_KEY else ""
        raise ConfigError(f"checkpoint '{folder}' holds no '{key}' tensors{why}")
    if check is not None:
        check({k: tuple(v.size) for k, v in stored.items()})
    state = {n: torch.empty(tuple(m.size), dtype=m.properties.dtype) for n, m in stored.items()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: state}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    return state


def _read_deepspeed(folder: Path, check: ShapeCheck | None) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a DeepSpeed checkpoint (any ZeRO stage), consolidated by DeepSpeed's
    own reader from the partition files."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ConfigError(f"'{folder}' is a DeepSpeed checkpoint; reading it needs the deepspeed package ({e}): "
                          "pip install '.[deepspeed]'") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED)
    if check is not None:
        check({k: tuple(v.shape) for k, v in state.items()})
    return {k: v.clone() for k, v in state.items()}  # ZeRO-1/2 gives views of one flat buffer


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a folder: from the index when the weights are sharded."""
    from safetensors import safe_open

    index, single = folder / INDEX_NAME, folder / WEIGHTS_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ConfigError(f"{folder}: shards listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        return {name: folder / f for name, f in weight_map.items()}
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ConfigError(f"'{folder}' has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def stored_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes
