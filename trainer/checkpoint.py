"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, last K kept.

A checkpoint is a folder `step_{N:08d}` holding the DCP shards of model + optimizer state and a
`train_state.pt` with the step, LR schedule, data-loader state and config. It is written under a
temporary name and renamed when complete, so a crash mid-save never leaves a loadable half.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save model + optimizer (DCP) and `train_state` for `step`; prune to the last `keep_last`."""
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(train_state, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final
