"""Encode throughput: data_prep.encode_latents vs a naive one-image-at-a-time loop, same VAE and data.

Both paths read the same JPEGs from a manifest, preprocess identically (resize + center crop),
encode with the same random-weight AutoencoderKL (8x downsampling, built from a small config) and
write MDS samples with the same schema; encode_latents additionally batches, decodes in threads
and commits resumable chunks. Runs alternate `--repeats` times; the best time of each is reported.

    python benchmarks/data_encode.py [--images 128 --resolution 128 --batch-sizes 4,16]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import encode_latents, images  # noqa: E402
from data_prep.schema import image_columns, latents_to_storage  # noqa: E402
from data_prep.tokenizer import Tokenizer  # noqa: E402
from examples import tiny_assets  # noqa: E402


def make_inputs(root: Path, n: int) -> Path:
    """n JPEG photos-sized-ish random images (varied sizes) + a JSONL manifest."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        size = (256 + 16 * (i % 5), 224 + 8 * (i % 7))
        (root / "img" / f"{i:04d}.jpg").write_bytes(tiny_assets.image_bytes(i, size, "RGB", "JPEG"))
        rows.append(json.dumps({"path": f"img/{i:04d}.jpg", "caption": tiny_assets.caption(i)}))
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return root / "manifest.jsonl"


def naive(manifest: Path, vae_dir: Path, tok_path: Path, out: Path, resolution: int) -> int:
    """The baseline: for each line, read, preprocess, encode one image, write one sample."""
    from diffusers import AutoencoderKL
    from streaming import MDSWriter

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    tok = Tokenizer(tok_path)
    sf = vae.config.scaling_factor
    c = vae.config.latent_channels
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    n = 0
    with MDSWriter(out=str(out), columns=image_columns((c, resolution // f, resolution // f))) as w:
        for line in manifest.read_text().splitlines():
            row = json.loads(line)
            x, orig = images.load_image((manifest.parent / row["path"]).read_bytes(), resolution)
            with torch.no_grad():
                dist = vae.encode(x[None]).latent_dist  # [1, C, h, w]
            w.write({"key": row["path"], "caption": row["caption"],
                     "caption_ids": np.asarray(tok.encode(row["caption"]), dtype=np.int32),
                     "latent_mean": latents_to_storage(dist.mean * sf)[0],
                     "latent_std": latents_to_storage(dist.std * sf)[0],
                     "orig_size": np.asarray(orig, dtype=np.int32)})
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-sizes", default="4,16", help="encode_latents batch sizes to measure")
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--block-out-channels", default="32,64,128,128", help="VAE widths (4 levels = 8x)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        manifest = make_inputs(root / "in", args.images)
        tok = tiny_assets.make_tiny_tokenizer(root / "tok" / "tok")
        blocks = [int(b) for b in args.block_out_channels.split(",")]
        vae = tiny_assets.make_tiny_vae(root / "vae", blocks, 4, args.resolution)
        n_params = sum(p.numel() for p in encode_latents.LatentEncoder(str(vae), 1).vae.encoder.parameters())
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        best = {b: float("inf") for b in ["naive", *batch_sizes]}
        for r in range(-1, args.repeats):  # round -1 warms up; rounds alternate sides so load hits both alike
            t = time.perf_counter()
            n = naive(manifest, vae, tok, root / f"naive{r}", args.resolution)
            best["naive"] = min(best["naive"], time.perf_counter() - t) if r >= 0 else best["naive"]
            for b in batch_sizes:
                t = time.perf_counter()
                rep = encode_latents.main([
                    "--input", str(manifest), "--out", str(root / f"ours{r}_{b}"), "--vae", str(vae),
                    "--tokenizer", str(tok), "--resolution", str(args.resolution), "--batch-size", str(b),
                    "--decode-workers", str(args.decode_workers), "--rank", "0", "--world-size", "1"])
                best[b] = min(best[b], time.perf_counter() - t) if r >= 0 else best[b]
                assert rep["written"] == n == args.images
        naive_ips = args.images / best["naive"]
        print(f"\n{args.images} JPEGs (~270x250) -> {args.resolution}x{args.resolution}, VAE encoder {n_params / 1e6:.1f}M "
              f"params {blocks}, latents 4x{args.resolution // 2 ** (len(blocks) - 1)}x"
              f"{args.resolution // 2 ** (len(blocks) - 1)}, torch threads {torch.get_num_threads()}, "
              f"best of {args.repeats}")
        print(f"naive one-image loop        : {best['naive']:7.2f} s  {naive_ips:7.2f} img/s")
        for b in batch_sizes:
            ours_ips = args.images / best[b]
            print(f"encode_latents (batch {b:>3}) : {best[b]:7.2f} s  {ours_ips:7.2f} img/s   "
                  f"ratio encode_latents/naive {ours_ips / naive_ips:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
