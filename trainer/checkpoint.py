"""Training checkpoints: Stateful objects registered once, saved atomically, resumed anywhere.

`CheckpointManager` (in the manner of torchtitan's) is handed the engine (model + optimizer, in the
engine's own format: DCP shards under the plain model's parameter names, or DeepSpeed's partition
files under `deepspeed/`), the global Stateful objects (the trainer's counters, the LR schedule) and
the per-rank ones (the data loader). It owns when to save (`checkpoint.interval`, the last step, a
preemption; `keep_last`/`keep_every` retention) and how to load (`checkpoint.resume`: the latest
that verifies, or a path; a loader saved by another number of data-parallel ranks continues
elastically). Its public API is `load()` and `save()`/`maybe_save()`.

A checkpoint is a folder `step_{N:08d}`: the engine's files, `train_state.pt` (format, config, step
and every global state by name) and one `rank_{r}.pt` per process with its per-rank states. It is
written under a temporary name and renamed by rank 0 once every rank has finished, so a crash
mid-save never leaves a loadable half: only `step_*` folders are ever loaded. No RNG state is
needed: diffusion noise is seeded by (seed, step, micro-batch) and documents by their sample index.

Integrity (trainer/checkpoint_files.py): our state files are pickle-free, `manifest.json` holds the
size and SHA-256 of every file, and weights are checked to be finite before a save and after a
load. A resume verifies before it loads: with `resume: auto` a damaged newest checkpoint is skipped
with a warning naming the damaged files and the step it falls back to; an explicit path that fails
stops with one line; where checkpoints exist but none is usable the run stops rather than start
from scratch. Retention never deletes the newest checkpoint saved after a clean step. Each engine
resumes only its own format; `python -m inference.convert` reads both.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch
import torch.distributed as dist

from config import CheckpointConfig, ConfigError
from parallel.engine import TrainingEngine

from .checkpoint_files import (
    TRUST_WARNING, CheckpointDamaged, PickledCheckpointFile, all_finite, digest_share, list_files, load_plain, read_manifest,
    save_plain, verify_folder, write_manifest,
)
from .checkpoint_weights import STATE_FILE, checkpoint_format
from .data import ElasticResumeUnsupported
from .preemption import TrainingDiverged

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it assumes one process; that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Config sections whose change makes a checkpoint unusable, and single keys outside them; everything
# else may change on resume. Execution-only keys inside them (how the same model is computed) may too.
UNSAFE_SECTIONS = ("model", "diffusion")
UNSAFE_KEYS = {"train.seq_len": "the loader's saved half-packed rows are laid out for the old length"}
EXECUTION_ONLY = ("model.attention",)  # the attention kernel: same model, same numbers up to rounding
ENGINE_NAMES = {"dcp": "parallel.engine=torch", "deepspeed": "parallel.engine=deepspeed"}
T = TypeVar("T")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UnsafeToSave(TrainingDiverged):
    """The weights or optimizer state hold NaN/Inf: saving them would poison the newest checkpoint."""


def checkpoint_dirs(root: Path, complete_only: bool = True) -> list[Path]:
    """Committed checkpoint folders under root, oldest first; with complete_only, those whose
    files are all present (train_state.pt and DCP .metadata or deepspeed/)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if _STEP_DIR.match(p.name) and (not complete_only or checkpoint_format(p) is not None))


def remove_unfinished_saves(root: Path) -> list[Path]:
    """Delete the `.tmp_step_N` folders a killed save left (never loaded; ~84 GB each at 7B), logging each.
    Runs once at start-up, after the resume decision, before this run saves anything."""
    removed = []
    for tmp in sorted(root.glob(".tmp_step_*")) if root.is_dir() else []:
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        sys.stderr.write(f"removed {tmp} ({size / 2**30:.2f} GiB): an unfinished save of an earlier run\n")
        removed.append(tmp)
    return removed


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


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
        sys.stderr.write(f"WARNING: {message}\n")


def weights_finite(engine: TrainingEngine) -> bool:
    """True when every rank's shards of the weights and optimizer moments are finite; one all-reduce."""
    bad = (~all_finite(engine.local_tensors())).to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class CheckpointManager:
    """Saves, prunes and resumes the registered state under one root folder (see the module docstring).

    `train_state`: the trainer's counters, the top-level fields of train_state.pt (what tools read:
    step, tokens_seen, ...); `states`: other global Stateful objects, saved there under their names;
    `rank_states`: per-rank ones (rank_{r}.pt), which may implement `load_elastic_state(states)` to
    continue from the states of every rank of a layout with another number of data-parallel ranks.
    `dp`: (this rank's data-parallel rank, the data-parallel size).
    """

    def __init__(
        self, cfg: CheckpointConfig, root: Path, engine: TrainingEngine, config: dict[str, Any],
        train_state: Stateful, states: dict[str, Stateful] | None = None, rank_states: dict[str, Stateful] | None = None,
        dp: tuple[int, int] = (0, 1), total_steps: int | None = None,
    ) -> None:
        self.cfg, self.root, self.engine, self.config = cfg, root, engine, config
        self.train_state, self.states, self.rank_states = train_state, states or {}, rank_states or {}
        self.dp, self.total_steps = dp, total_steps
        self.last_saved: Path | None = None
        self.resumed_from: Path | None = None
        self._pending: tuple[Future, Path, Path, dict] | None = None
        self._saved_step: int | None = None

    # ---- saving ---------------------------------------------------------------------------------
    def maybe_save(self, step: int, preempted: bool = False, clean: bool = True) -> Path | None:
        """Save when it is time: every `interval` steps, at the last step, or on a preemption."""
        due = (self.cfg.interval and step % self.cfg.interval == 0) or step == self.total_steps
        # After a skipped step the step number has not moved: it is saved again only for a preemption.
        due = due and step != self._saved_step
        return self.save(step, clean) if self.cfg.enabled and (due or preempted) else None

    def save(self, step: int, clean: bool = True) -> Path:
        """Write checkpoint `step` (with async_save, the engine's write overlaps training until the next
        call). `clean=False` (after skipped steps) keeps retention from counting it as a good one.
        Raises UnsafeToSave, writing nothing, when the weights or optimizer moments are not finite."""
        self.wait()
        if not weights_finite(self.engine):
            raise UnsafeToSave(f"the weights or optimizer state hold NaN/Inf at step {step}: not saved, so the "
                               f"newest checkpoint stays a good one; the last good checkpoint is "
                               f"{self.last_saved or self.resumed_from}")
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp_step_{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        save_plain({"dp": self.dp, **{k: s.state_dict() for k, s in self.rank_states.items()}},
                   tmp / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            save_plain({"format": self.engine.format, "config": self.config, "step": step,
                        **self.train_state.state_dict(), **{k: s.state_dict() for k, s in self.states.items()}},
                       tmp / STATE_FILE)
        info = {"step": step, "clean": clean}
        future = self.engine.save(tmp, self.cfg.async_save)
        if future is None:
            self._commit(tmp, final, info)
        else:
            self._pending = (future, tmp, final, info)
        self.last_saved, self._saved_step = final, step
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
        for old in done[: -self.cfg.keep_last]:
            if old not in protected and not (self.cfg.keep_every and step_of(old) % self.cfg.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------------
    def load(self, resume: str | Path | None = None) -> Path | None:
        """Resume from `resume` (default `checkpoint.resume`: auto | none | a path); returns the folder
        loaded, or None when there is nothing to resume from."""
        found = _first_usable(str(resume if resume is not None else self.cfg.resume), self.root, self._load_from)
        self.resumed_from = None if found is None else found[0]
        if _rank() == 0:
            remove_unfinished_saves(self.root)
        return self.resumed_from

    def _load_from(self, path: Path) -> None:
        """Load the engine, then every registered state; refuses another model/diffusion config,
        listing the fields, and a checkpoint of the other engine."""
        saved = load_plain(path / STATE_FILE)
        diffs = config_differences(saved["config"], self.config)
        if diffs:
            raise ConfigError(f"checkpoint {path} does not fit this config: " + "; ".join(diffs))
        fmt = checkpoint_format(path)
        if fmt != self.engine.format:
            raise ConfigError(
                f"checkpoint {path} was written by {ENGINE_NAMES.get(fmt, fmt)} and resumes only with it (this run "
                f"uses {ENGINE_NAMES[self.engine.format]}); `python -m inference.convert` still reads its weights"
            )
        self.engine.load(path)
        if not weights_finite(self.engine):
            raise CheckpointDamaged(path, ["its weights or optimizer state hold NaN/Inf"])
        self.train_state.load_state_dict(saved)
        for name, state in self.states.items():
            state.load_state_dict(saved[name])
        self._load_rank_states(path)

    def _load_rank_states(self, path: Path) -> None:
        rank_file = path / f"rank_{_rank():05d}.pt"
        mine = load_plain(rank_file) if rank_file.is_file() else {}
        if not self.rank_states:
            return
        if tuple(mine.get("dp", ())) == tuple(self.dp):
            for name, state in self.rank_states.items():
                state.load_state_dict(mine[name])
            return
        old = data_parallel_states(path)
        for name, state in self.rank_states.items():
            try:
                if not hasattr(state, "load_elastic_state"):
                    raise ElasticResumeUnsupported(f"{type(state).__name__} has no load_elastic_state")
                report = state.load_elastic_state([s[name] for s in old])
            except ElasticResumeUnsupported as e:
                log.warning("data-parallel size changed since %s: the data order restarts (%s: %s)", path, name, e)
                continue
            if _rank() == 0:
                print(f"data-parallel ranks {len(old)} -> {self.dp[1]}: the data continues ({report})")


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


def config_differences(saved: dict, current: dict, sections: tuple[str, ...] = UNSAFE_SECTIONS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, within `sections` (execution-only keys
    excepted) and among UNSAFE_KEYS (with why)."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if prefix in EXECUTION_ONLY:
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{prefix}.{k}")]
        return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]

    def value(cfg: dict, dotted: str) -> Any:
        for k in dotted.split("."):
            cfg = cfg.get(k) if isinstance(cfg, dict) else None
        return cfg

    diffs = [d for s in sections for d in walk(saved.get(s), current.get(s), s)]
    return diffs + [f"{k}: {value(saved, k)!r} -> {value(current, k)!r} ({why})" for k, why in UNSAFE_KEYS.items()
                    if value(saved, k) != value(current, k)]


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
