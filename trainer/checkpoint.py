"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, resumable anywhere.

A checkpoint is a folder `step_{N:08d}` holding the DCP shards of model + optimizer state (under
the plain model's parameter names, whatever the layout, so a run saved with FSDP resumes with TP or
one process), `train_state.pt` (step, LR schedule, config, wandb run id) and one `rank_{r}.pt` per
process with its data-loader state. It is written under a temporary name and renamed by rank 0 once
every rank has finished, so a crash mid-save never leaves a loadable half: only `step_*` folders
are ever loaded. No RNG state is needed: diffusion noise is seeded by (seed, step, micro-batch)
and documents by their sample index.

With `parallel.engine=deepspeed` the model and optimizer state are DeepSpeed's own partition files
under `step_N/deepspeed/` instead of DCP shards (train_state.pt says which: `format`); everything
else (atomic commit, retention, loader state, config check) is shared. Each engine resumes only its
own format; `python -m inference.convert` reads both.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model.config_base import ConfigError

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it assumes one process; that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Config sections whose change makes a checkpoint unusable; everything else may change on resume.
UNSAFE_SECTIONS = ("model", "diffusion")


DCP, DEEPSPEED = "dcp", "deepspeed"  # train_state["format"]


def checkpoint_format(path: Path) -> str | None:
    """'dcp' or 'deepspeed' for a complete checkpoint folder, None otherwise."""
    if not (path / "train_state.pt").is_file():
        return None
    if (path / ".metadata").is_file():
        return DCP
    if (path / DEEPSPEED).is_dir():
        return DEEPSPEED
    return None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and checkpoint_format(p) is not None)


def merge_parts(parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names equal the full model's, over this rank's model parts.

    Pipeline ranks may hold several stages; their `layers` are merged into one ModuleDict.
    """
    if len(parts) == 1:
        return parts[0]
    holder = nn.Module()
    layers = nn.ModuleDict()
    for part in parts:
        for name, child in part.named_children():
            if name == "layers":
                layers.update(child)
            else:
                holder.add_module(name, child)
    holder.add_module("layers", layers)
    return holder


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves (optionally asynchronously) and prunes checkpoints under one root folder."""

    def __init__(self, root: Path, keep_last: int, keep_every: int = 0, async_save: bool = False) -> None:
        self.root, self.keep_last, self.keep_every, self.async_save = root, keep_last, keep_every, async_save
        self._pending: tuple[Future, Path, Path] | None = None

    def save(
        self, step: int, parts: list[nn.Module], optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
        rank_state: dict[str, Any], engine: Any = None,
    ) -> Path:
        """Write checkpoint `step`; with async_save the DCP write overlaps training until the next call.

        `engine`: a DeepSpeedEngine, whose own partition files then replace the DCP shards.
        """
        self.wait()
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp_step_{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rank_state, tmp / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            torch.save({**train_state, "format": DEEPSPEED if engine is not None else DCP}, tmp / "train_state.pt")
        if engine is not None:
            from parallel.deepspeed_engine import save_engine_checkpoint

            if self.async_save:
                raise ConfigError("checkpoint.async_save is not supported with parallel.engine=deepspeed")
            save_engine_checkpoint(engine, tmp)
            self._commit(tmp, final)
            return final
        model_sd, optim_sd = get_state_dict(merge_parts(parts), optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save in flight (call before exiting)."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path) -> None:
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        done = checkpoint_dirs(self.root)
        for old in done[: -self.keep_last]:
            step = int(_STEP_DIR.match(old.name).group(1))
            if not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint folder to resume from: `auto` = latest complete one under root, if any."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / "train_state.pt").is_file():  # a run's checkpoints folder
        found = checkpoint_dirs(path)
        path = found[-1] if found else path
    if checkpoint_format(path) is None:
        raise ConfigError(
            f"checkpoint.resume={resume}: '{path}' is not a complete checkpoint "
            "(needs train_state.pt and DCP .metadata or a deepspeed/ folder)"
        )
    return path


def config_differences(saved: dict, current: dict, sections: tuple[str, ...] = UNSAFE_SECTIONS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, within `sections`."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{prefix}.{k}")]
        return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]

    return [d for s in sections for d in walk(saved.get(s), current.get(s), s)]


def load_checkpoint(
    path: Path, parts: list[nn.Module], optimizer: torch.optim.Optimizer, config: dict, engine: Any = None,
) -> tuple[dict, dict]:
    """Load model + optimizer into this rank's (parallelised) parts or DeepSpeed `engine`; return
    (train_state, rank_state). Refuses a checkpoint whose model or diffusion config differs, listing
    the fields, and one written by the other engine.
    """
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    diffs = config_differences(train_state["config"], config)
    if diffs:
        raise ConfigError(f"checkpoint {path} does not fit this config: " + "; ".join(diffs))
    fmt, want = checkpoint_format(path), DEEPSPEED if engine is not None else DCP
    if fmt != want:
        engines = {DCP: "parallel.engine=torch", DEEPSPEED: "parallel.engine=deepspeed"}
        raise ConfigError(
            f"checkpoint {path} was written by {engines.get(fmt, fmt)} and resumes only with it (this run uses "
            f"{engines[want]}); `python -m inference.convert` still reads its weights"
        )
    if engine is not None:
        from parallel.deepspeed_engine import load_engine_checkpoint

        load_engine_checkpoint(engine, path)
        return train_state, _rank_state(path)
    module = merge_parts(parts)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return train_state, _rank_state(path)


def data_parallel_states(path: Path) -> list[dict]:
    """One saved rank state per old data-parallel rank, in rank order (tp/pp replicas share one)."""
    by_dp: dict[int, dict] = {}
    for f in sorted(path.glob("rank_*.pt")):
        state = torch.load(f, weights_only=False)
        if "dp" in state:
            by_dp.setdefault(state["dp"][0], state)
    sizes = {s["dp"][1] for s in by_dp.values()}
    if len(sizes) != 1 or sorted(by_dp) != list(range(sizes.pop())):
        raise ConfigError(f"checkpoint {path}: the per-rank data states (rank_*.pt) are incomplete")
    return [by_dp[r] for r in sorted(by_dp)]


def _rank_state(path: Path) -> dict:
    rank_file = path / f"rank_{_rank():05d}.pt"
    return torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}
