"""Merge the workers' parts of an encode_latents/tokenize_text output into one streaming dataset.

Writes `OUT/index.json` (via streaming's `merge_index`, shard paths relative to OUT), the summed
skip report `OUT/report.json`, and `OUT/dataset_info.json` (the job settings + sample count).
Refuses missing or unfinished parts unless `--allow-partial`.

    python -m data_prep.merge_index OUT [--allow-partial]
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

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
    summary = {k: report[k] for k in ("parts", "complete", "records", "written", "skipped_total", "skipped")}
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
