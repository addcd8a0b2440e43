"""Merge the workers' parts of an encode_latents/tokenize_text output into one streaming dataset.

Writes `OUT/index.json` (via streaming's `merge_index`, shard paths relative to OUT), the summed
skip report `OUT/report.json`, and `OUT/dataset_info.json` (the job settings + sample count).
Refuses missing or unfinished parts unless `--allow-partial`, and any chunk whose index holds a
column or encoding outside `data_prep.schema` (e.g. a `pkl` column), naming it, before reading it.

    python -m data_prep.merge_index OUT [--allow-partial]
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import json
import logging
from typing import Sequence

from .cli import run_tool
from .sharding import merge_parts


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the merged report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder holding part-*/ sub-folders")
    ap.add_argument("--allow-partial", action="store_true",
                    help="index the committed chunks even if some parts are missing or unfinished")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = merge_parts(args.out, args.allow_partial)
    summary = {k: report[k] for k in ("parts", "complete", "records", "written", "skipped_total", "skipped",
                                      "renamed_duplicate_keys")}
    print(json.dumps(summary, indent=2))
    return report


def cli() -> None:
    """Console entry point (`transfusion-merge-index`): errors a user must fix print as one line."""
    run_tool(main, "merge_index")


if __name__ == "__main__":
    cli()
