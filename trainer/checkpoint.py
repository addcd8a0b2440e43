"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, resumable anywhere.

A checkpoint is a folder `step_{N:08d}` holding the DCP shards of model + optimizer state (under
the plain model's parameter names, whatever the layout, so a run saved with FSDP resumes with TP or
one process), `train_state.pt` (step, LR schedule, config, wandb run id) and one `rank_{r}.pt` per
process with its data-loader state. It is written under a temporary name and renamed by rank 0 once
every rank has finished, so a crash mid-save never leaves a loadable half: only `step_*` folders
are ever loaded. No RNG state is needed: diffusion noise is seeded by (seed, step, micro-batch)
and documents by their sample index.

Integrity (trainer/checkpoint_files.py): our state files are pickle-free, `manifest.json` holds the
size and SHA-256 of every file, and weights are checked to be finite before a save and after a
load. A resume verifies before it loads: with `resume: auto` a damaged newest checkpoint is skipped
with a warning naming the damaged files and the step it falls back to; an explicit path that fails
stops with one line; where checkpoints exist but none is usable the run stops rather than start
from scratch. Retention never deletes the newest checkpoint saved after a clean step.

With `parallel.engine=deepspeed` the model and optimizer state are DeepSpeed's own partition files
under `step_N/deepspeed/` instead of DCP shards (train_state.pt says which: `format`); everything
else (atomic commit, retention, loader state, config check) is shared. Each engine resumes only its
own format; `python -m inference.convert` reads both.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from config import ConfigError

from .checkpoint_files import (
    TRUST_WARNING, CheckpointDamaged, PickledCheckpointFile, all_finite, digest_share, list_files, load_plain, read_manifest,
    save_plain, verify_folder, write_manifest,
)

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it assumes one process; that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Config sections whose change makes a checkpoint unusable; everything else may change on resume.
UNSAFE_SECTIONS = ("model", "diffusion")


T = TypeVar("T")
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


def checkpoint_dirs(root: Path, complete_only: bool = True) -> list[Path]:
    """Committed checkpoint folders under root, oldest first; with complete_only, those whose
    files are all present (train_state.pt and DCP .metadata or deepspeed/)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if _STEP_DIR.match(p.name) and (not complete_only or checkpoint_format(p) is not None))


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_lists(mine: list) -> list:
    """Concatenate one list per rank, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(mine)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return [x for part in parts for x in part]


def _gather_dicts(mine: dict) -> dict:
    merged: dict = {}
    for part in _gather_lists([mine]):
        merged.update(part)
    return merged


def _warn(message: str) -> None:
    """A loud warning, once per job (rank 0), on stderr."""
    if _rank() == 0:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


class UnsafeToSave(RuntimeError):
    """The weights or optimizer state hold NaN/Inf: saving them would poison the newest checkpoint."""


def weights_finite(parts: list[nn.Module], optimizer: Any = None, engine: Any = None) -> bool:
    """True when every rank's local parameters (and optimizer moments) are finite; one all-reduce."""
    if engine is not None:  # DeepSpeed: ZeRO-3 keeps this rank's partition in ds_tensor
        tensors = [getattr(p, "ds_tensor", p.data) for p in engine.module.parameters()]
    else:
        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t

        tensors = [local(p.detach()) for part in parts for p in part.parameters()]
        if optimizer is not None:
            tensors += [local(v) for st in optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0]
    bad = (~all_finite(tensors)).to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class Checkpointer:
    """Saves (optionally asynchronously) and prunes checkpoints under one root folder."""

    def __init__(self, root: Path, keep_last: int, keep_every: int = 0, async_save: bool = False) -> None:
        self.root, self.keep_last, self.keep_every, self.async_save = root, keep_last, keep_every, async_save
        self._pending: tuple[Future, Path, Path, dict] | None = None

    def save(
        self, step: int, parts: list[nn.Module], optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
        rank_state: dict[str, Any], engine: Any = None,
    ) -> Path:
        """Write checkpoint `step`; with async_save the DCP write overlaps training until the next call.

        `engine`: a DeepSpeedEngine, whose own partition files then replace the DCP shards.
        `train_state["bad_steps"]` > 0 marks the checkpoint as not clean (see `_prune`). Raises
        UnsafeToSave, writing nothing, when the weights or optimizer moments are not finite.
        """
        self.wait()
        if not weights_finite(parts, optimizer, engine):
            raise UnsafeToSave(f"the weights or optimizer state hold NaN/Inf at step {step}: not saved, so the "
                               "newest checkpoint stays a good one")
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp_step_{step:08d}"
        info = {"step": step, "clean": int(train_state.get("bad_steps", 0)) == 0}
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        save_plain(rank_state, tmp / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            save_plain({**train_state, "format": DEEPSPEED if engine is not None else DCP}, tmp / "train_state.pt")
        if engine is not None:
            from parallel.deepspeed_engine import save_engine_checkpoint

            if self.async_save:
                raise ConfigError("checkpoint.async_save is not supported with parallel.engine=deepspeed")
            save_engine_checkpoint(engine, tmp)
            self._commit(tmp, final, info)
            return final
        model_sd, optim_sd = get_state_dict(merge_parts(parts), optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), tmp, final, info)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final, info)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save in flight (call before exiting)."""
        if self._pending is not None:
            future, tmp, final, info = self._pending
            self._pending = None
            future.result()
            self._commit(tmp, final, info)

    def _commit(self, tmp: Path, final: Path, info: dict[str, Any]) -> None:
        """Hash the folder (each rank a share), write the manifest, rename, prune."""
        _barrier()
        files = [list_files(tmp) if _rank() == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(files, src=0)
        digests = _gather_dicts(digest_share(tmp, files[0], _rank(), _world()))
        if _rank() == 0:
            write_manifest(tmp, digests, **info)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        """Keep the last `keep_last`, every `keep_every`-th, and the newest clean checkpoint."""
        done = checkpoint_dirs(self.root, complete_only=False)
        clean = [d for d in done if _is_clean(d)]
        protected = {clean[-1]} if clean else set()
        for old in done[: -self.keep_last]:
            if old not in protected and not (self.keep_every and step_of(old) % self.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)


def _is_clean(path: Path) -> bool:
    try:
        return bool(read_manifest(path).get("clean", False))
    except CheckpointDamaged:
        return False


_warned_trust = False


def warn_untrusted_once(path: Path) -> None:
    """Print TRUST_WARNING once per process, naming the checkpoint that triggered it."""
    global _warned_trust
    if not _warned_trust:
        _warned_trust = True
        _warn(f"{TRUST_WARNING} (loading {path})")


def _candidates(resume: str, root: Path) -> tuple[list[Path], bool]:
    """The folders to try, newest first, and whether a damaged one may be skipped for an older one."""
    if resume == "none":
        return [], False
    if resume == "auto":
        return checkpoint_dirs(root, complete_only=False)[::-1], True
    path = Path(resume)
    inside = path.resolve().is_relative_to(root.resolve())
    if path.is_dir() and not _STEP_DIR.match(path.name) and not (path / "train_state.pt").is_file():
        found = checkpoint_dirs(path, complete_only=False)  # a run's checkpoints folder: its latest
        if found:
            if not inside:
                warn_untrusted_once(path)
            return found[::-1], True
    if checkpoint_format(path) is None:
        raise ConfigError(
            f"checkpoint.resume={resume}: '{path}' is not a complete checkpoint "
            "(needs train_state.pt and DCP .metadata or a deepspeed/ folder)"
        )
    if not inside:
        warn_untrusted_once(path)
    return [path], False


def _first_usable(resume: str, root: Path, load: Callable[[Path], T]) -> tuple[Path, T] | None:
    """Verify (and `load`) the newest candidate; with `auto`, fall back past damaged ones, loudly."""
    candidates, may_skip = _candidates(resume, root)
    skipped: list[CheckpointDamaged] = []
    for path in candidates:
        try:
            verify_folder(path, _rank(), _world(), _gather_lists)
            loaded = load(path)
        except CheckpointDamaged as e:
            if not may_skip:
                older = [d.name for d in checkpoint_dirs(path.parent) if step_of(d) < step_of(path)] \
                    if _STEP_DIR.match(path.name) else []
                hint = f"; the previous checkpoint there is {older[-1]}" if older else ""
                raise ConfigError(f"{e}{hint}") from None
            skipped.append(e)
            _warn(f"{e}; skipping it")
            continue
        except PickledCheckpointFile as e:
            raise ConfigError(str(e)) from None
        if skipped:
            _warn(f"resuming from {path} (step {step_of(path)}), older than the newest checkpoint, because "
                  f"{len(skipped)} newer one(s) are damaged: {', '.join(e.path.name for e in skipped)}")
        return path, loaded
    if skipped:
        raise ConfigError(
            f"none of the {len(skipped)} checkpoints under {skipped[0].path.parent} is usable (newest: {skipped[0]}); "
            "the run does not restart from scratch on its own: move them away or set checkpoint.resume=none"
        )
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint folder to resume from (`auto`: the newest under root that verifies), or None."""
    found = _first_usable(resume, root, lambda path: None)
    return None if found is None else found[0]


def resume_checkpoint(
    resume: str, root: Path, parts: list[nn.Module], optimizer: torch.optim.Optimizer, config: dict,
    engine: Any = None,
) -> tuple[Path, dict, dict] | None:
    """Verify and load the checkpoint `resume` names (see resolve_resume) into the parts/optimizer or
    DeepSpeed engine; returns (path, train_state, rank_state), or None when there is none."""
    found = _first_usable(resume, root, lambda path: load_checkpoint(path, parts, optimizer, config, engine))
    return None if found is None else (found[0], *found[1])


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
    train_state = load_plain(path / "train_state.pt")
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
    else:
        module = merge_parts(parts)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if not weights_finite(parts, None if engine is not None else optimizer, engine):
        raise CheckpointDamaged(path, ["its weights or optimizer state hold NaN/Inf"])
    return train_state, _rank_state(path)


def data_parallel_states(path: Path) -> list[dict]:
    """One saved rank state per old data-parallel rank, in rank order (tp/pp replicas share one)."""
    by_dp: dict[int, dict] = {}
    for f in sorted(path.glob("rank_*.pt")):
        state = load_plain(f)
        if "dp" in state:
            by_dp.setdefault(state["dp"][0], state)
    sizes = {s["dp"][1] for s in by_dp.values()}
    if len(sizes) != 1 or sorted(by_dp) != list(range(sizes.pop())):
        raise ConfigError(f"checkpoint {path}: the per-rank data states (rank_*.pt) are incomplete")
    return [by_dp[r] for r in sorted(by_dp)]


def _rank_state(path: Path) -> dict:
    rank_file = path / f"rank_{_rank():05d}.pt"
    return load_plain(rank_file) if rank_file.is_file() else {}
