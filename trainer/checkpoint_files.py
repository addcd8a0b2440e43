"""The files of a checkpoint folder: pickle-free state files and an integrity manifest.

Our own files (`train_state.pt`, `rank_*.pt`) hold only tensors, numbers, strings, bools, None,
lists, tuples and dicts, are checked for that before they are written, and are read with
`torch.load(weights_only=True)`, so a crafted file cannot run code when it is loaded. DCP's
`.metadata` is a pickle that torch itself loads: a training checkpoint is therefore trusted-only
(see the README's trust section).

`manifest.json` lists the size and SHA-256 of every file of the folder, written at save time after
all ranks finished writing; a resume or a conversion verifies it first. Hashing and verification
are split across ranks (file i by rank i mod world), so each rank reads about 1/world of the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20
TRUST_WARNING = (
    "training checkpoints are trusted-only: DCP's .metadata is a pickle that torch unpickles, so a crafted "
    "checkpoint can run code; resume or convert only checkpoints that you or your team wrote"
)
_SCALARS = (bool, int, float, str, type(None), torch.Tensor, torch.dtype, torch.device)


class CheckpointDamaged(Exception):
    """A checkpoint folder whose files do not match its manifest (or cannot be read)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(f"checkpoint {path} is damaged: {shown}")
        self.path, self.problems = path, problems


class PickledCheckpointFile(Exception):
    """A state file that needs pickle to load: a pre-release format, or not written by this trainer."""


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, _SCALARS):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoint state files "
                    "hold only tensors, numbers, strings, lists and dicts (convert it in its state_dict())")


def save_plain(obj: Any, path: Path) -> None:
    """torch.save a plain state tree (checked first, so it always loads with weights_only=True)."""
    check_plain(obj, path.name)
    torch.save(obj, path)


def load_plain(path: Path) -> Any:
    """Load one of our state files without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise PickledCheckpointFile(
            f"{path} holds pickled Python objects{what} and was not loaded: {path.parent} is in a pre-release "
            f"checkpoint format (from before checkpoints became pickle-free) that this version cannot resume, or "
            f"was not written by this trainer; start fresh (checkpoint.resume=none or another train.output_dir), "
            f"or resume it with the commit that wrote it"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        raise CheckpointDamaged(path.parent, [f"{path.name} cannot be read ({str(e).splitlines()[0]})"]) from None


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def list_files(folder: Path) -> list[str]:
    """Every file under folder (relative POSIX paths, sorted), the manifest excepted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def digest_share(folder: Path, files: list[str], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """This rank's share of the digests: files i with i % world == rank."""
    return {f: file_digest(folder / f) for i, f in enumerate(files) if i % world == rank}


def write_manifest(folder: Path, digests: dict[str, dict[str, Any]], **info: Any) -> None:
    """Write manifest.json (then fsync it): the digests of every file plus `info` (step, clean, ...)."""
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "algorithm": "sha256", **info,
                   "files": dict(sorted(digests.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest; raises CheckpointDamaged if it is missing or unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointDamaged(folder, [f"{MANIFEST} is missing (written by an older version, or damaged)"])
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(folder, [f"{MANIFEST} is unreadable ({e})"]) from None
    return manifest


def verify_share(folder: Path, manifest: dict[str, Any], rank: int, world: int) -> list[str]:
    """Problems with this rank's share of the manifest's files (missing, wrong size, wrong hash)."""
    problems = []
    for i, (name, want) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{name} has {size} bytes, {want.get('bytes')} were written")
        elif file_digest(path)["sha256"] != want.get("sha256"):
            problems.append(f"{name} does not match its SHA-256 (bytes changed after it was written)")
    return problems


def verify_folder(folder: Path, rank: int = 0, world: int = 1,
                  gather: Callable[[list[str]], list[str]] = lambda x: x) -> dict[str, Any]:
    """Check every file against the manifest; `gather` merges the ranks' problem lists. Returns the
    manifest; raises CheckpointDamaged naming the damaged files."""
    manifest = read_manifest(folder)
    problems = gather(verify_share(folder, manifest, rank, world))
    if problems:
        raise CheckpointDamaged(folder, sorted(problems))
    return manifest


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: True when every element of every tensor is finite (one pass, no sync)."""
    ok = torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    for t in tensors:
        if t.is_floating_point() and t.numel():
            ok = ok & torch.isfinite(t).all().to(ok.device)
    return ok
