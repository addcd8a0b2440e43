"""Lets a tool run as a file: `python data_prep/<tool>.py` (from the repo or from any other folder).

Each tool's first statement after its `__future__` import is

    if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

Run as a file, the tool is the `__main__` module without a package, and `sys.path[0]` is this folder,
so the import finds this module as the top-level `_as_package`. It puts the repo root first on
`sys.path` in place of this folder and gives `__main__` the package `data_prep`, so the tool's
relative imports (`from .cli import ...`) load the real package, as under `python -m data_prep.<tool>`
or the console scripts `transfusion-<tool>` (pyproject.toml), which never import this module.
"""

import sys
from pathlib import Path

if not __package__:  # imported by a tool run as a file (never as data_prep._as_package)
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    sys.modules["__main__"].__package__ = "data_prep"
