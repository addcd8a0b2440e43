"""Small CLI helpers shared by the data_prep tools: YAML defaults, logging, list arguments, errors.

Every tool runs as `python -m data_prep.<tool>`, as `python data_prep/<tool>.py` (each tool starts
with one line that imports `data_prep/_as_package.py` when run that way) and as
the console script `transfusion-<tool>` (pyproject.toml).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

import yaml


def parse_with_config(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`; values in `--config file.yaml` become defaults that explicit flags override.

    YAML keys are the long option names with '-' or '_' (e.g. `block_out_channels: [32, 64, 64]`).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            data: dict[str, Any] = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{known.config}: expected a mapping of option: value")
        actions = {a.dest: a for a in ap._actions if a.dest not in ("help", "config")}
        defaults = {}
        for key, value in data.items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise SystemExit(f"{known.config}: unknown option '{key}' (valid: {', '.join(sorted(actions))})")
            if actions[dest].nargs in ("+", "*"):  # e.g. input: [a.jsonl, b.jsonl]
                value = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            elif isinstance(value, list):  # e.g. block_out_channels: [32, 64, 64]
                value = ",".join(str(v) for v in value)
            defaults[dest] = value
        ap.set_defaults(**defaults)
        for action in ap._actions:  # YAML satisfies required options
            if action.dest in defaults:
                action.required = False
    return ap.parse_args(argv)


def int_list(text: str | Sequence[int]) -> list[int]:
    """'32,64,64' (or a YAML list) -> [32, 64, 64]."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def setup_logging() -> None:
    """INFO-level logs with timestamps, once per process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def local_abspath(path: str) -> str:
    """Absolute path for local paths (so a rerun from another cwd matches); URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def run_tool(main: Callable[[Sequence[str] | None], Any], name: str) -> None:
    """Run a tool's `main` as a command: a failure a user must fix is one line on stderr, exit 1.

    Set DATA_PREP_TRACEBACK=1 to see the traceback instead.
    """
    try:
        main(None)
    except (OSError, ValueError, RuntimeError) as e:
        if os.environ.get("DATA_PREP_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        sys.exit(f"{name}: error: {message}")
