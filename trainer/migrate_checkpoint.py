"""Migrate a checkpoint written before checkpoints became pickle-free (and had a manifest).

    python -m trainer.migrate_checkpoint <output_dir>/checkpoints/step_00000300 [...]

Old `rank_*.pt` files pickled the packer's Row/FlatDoc dataclasses and numpy arrays. They are read
here with `weights_only=True` plus an allowlist of exactly those types (no other global can be
unpickled), rewritten as plain state, and the folder gets its integrity manifest. Only for
checkpoints you trust: the folder's DCP `.metadata` is a pickle either way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_format, step_of
from .checkpoint_files import (
    MANIFEST, PickledCheckpointFile, digest_share, list_files, load_plain, save_plain, write_manifest,
)
from .packing import FlatDoc, Row, to_plain


def _allowed_globals() -> list[Any]:
    """The types old state files pickled: the packer's dataclasses and numpy arrays/dtypes."""
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.int64, np.int32, np.bool_, np.float32, np.float16, np.uint16)]
    return [Row, FlatDoc, reconstruct, np.ndarray, np.dtype, *dtypes]


def _plain_packer(state: dict) -> dict:
    """An old packer state (Row/FlatDoc objects) as plain state."""
    return {"row": to_plain(state["row"]), "fill": int(state["fill"]),
            "waiting": [to_plain(d) for d in state["waiting"]], "ready": [to_plain(r) for r in state["ready"]]}


def migrate(folder: Path) -> list[str]:
    """Rewrite folder's state files as plain state and add the manifest; returns what changed."""
    if checkpoint_format(folder) is None:
        raise ValueError(f"'{folder}' is not a complete checkpoint folder (train_state.pt + .metadata)")
    changed = []
    for path in [folder / "train_state.pt", *sorted(folder.glob("rank_*.pt"))]:
        try:
            load_plain(path)
            continue
        except PickledCheckpointFile:
            pass
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
        packer = state.get("loader", {}).get("packer") if isinstance(state, dict) else None
        if packer is not None:
            state["loader"]["packer"] = _plain_packer(packer)
        save_plain(state, path)
        changed.append(path.name)
    if not (folder / MANIFEST).is_file():
        write_manifest(folder, digest_share(folder, list_files(folder), 0, 1), step=step_of(folder), clean=True)
        changed.append(MANIFEST)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="step_N checkpoint folders")
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            changed = migrate(folder)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"migrate_checkpoint: {folder}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"{folder}: {'rewrote ' + ', '.join(changed) if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
