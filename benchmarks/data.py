"""Training-loader throughput: packed tokens/s per loader process at 7B shapes (seq 4096, 256-patch
images of 8x32x32 latents, 1:1 text:image by tokens), read from MDS shards written here.

    python benchmarks/data.py [--images 3000] [--texts 3000] [--batches 40] [--skip-encode]

One GPU at 7B consumes ~4k tokens/s (40% MFU on an H100); the target is >= 100k tokens/s per
loader process. Then runs benchmarks/data_encode.py (encode_latents vs a naive one-image loop).
"""

from __future__ import annotations

import argparse
import runpy
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from data_prep.schema import TEXT_COLUMNS, image_columns
from config import load_config
from trainer.data import build_loader

REPO = Path(__file__).resolve().parents[1]
LATENT = (8, 32, 32)


def write(root: Path, n_images: int, n_texts: int) -> None:
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(root / "images"), columns=image_columns(LATENT)) as w:
        for i in range(n_images):
            w.write({
                "key": str(i), "caption": "x", "orig_size": np.array([256, 256], np.int32),
                "caption_ids": rng.integers(10, 32000, size=int(rng.integers(8, 64))).astype(np.int32),
                "latent_mean": rng.standard_normal(LATENT).astype(np.float16),
                "latent_std": (0.05 * rng.random(LATENT)).astype(np.float16),
            })
    with MDSWriter(out=str(root / "text"), columns=TEXT_COLUMNS) as w:
        for i in range(n_texts):
            n = int(min(rng.lognormal(5.7, 0.9), 8000))
            w.write({"key": str(i), "tokens": rng.integers(10, 32000, size=n + 2).astype(np.int32)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--skip-encode", action="store_true", help="only the loader measurement")
    args = ap.parse_args()
    # Kept between runs (outputs/ is git-ignored): streaming's prefetch threads outlive the loader,
    # so a temporary folder would vanish under them.
    root = REPO / "outputs" / "bench_data" / f"{args.images}x{args.texts}"
    if not (root / "text" / "index.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        write(root, args.images, args.texts)
        print(f"wrote {args.images} image + {args.texts} text samples in {time.perf_counter() - t0:.1f}s")
    cfg = load_config(REPO / "configs" / "7b.yaml", [
        "data.source=streaming", "train.batch_size=1",
        f"data.streams=[{{path: {root / 'images'}, kind: image}}, {{path: {root / 'text'}, kind: text}}]",
    ])
    loader = build_loader(cfg)
    next(loader)  # opens the shards
    t0 = time.perf_counter()
    tokens = images = 0
    for _ in range(args.batches):
        b = next(loader)
        tokens += b.tokens.numel()
        images += b.num_images
    dt = time.perf_counter() - t0
    rate = tokens / dt
    print(f"loader: {tokens} packed positions ({images} images) in {dt:.2f}s = {rate:,.0f} tokens/s per process")
    print(f"ratio vs one 7B GPU's appetite (~4,000 tokens/s): {rate / 4000:.1f}x; target 100k: "
          f"{'met' if rate >= 100_000 else 'NOT met'}")
    if not args.skip_encode:
        sys.argv = [str(Path(__file__).with_name("data_encode.py"))]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
