"""Train a small diffusers VQModel (the discrete-image baseline's tokenizer) and save_pretrained it.

The discrete-token baseline (`model.image_representation: tokens`, Chameleon-style) needs an image
tokenizer trained on the same images as the VAE. Loss: MSE (+ optional L1) reconstruction + the
quantizer's codebook and commitment terms (VQModel's `commit_loss`). The codebook starts on encoder
outputs of real images, and codes unused over `--restart-every` steps are re-seeded from encoder
outputs of the current batch, so a small codebook does not collapse onto a few entries. Inputs are
those of train_vae / encode_latents (manifest, tar, parquet, folder); captions are ignored, bad
images skipped and counted.

    python -m data_prep.train_vq --input data/train/manifest.jsonl --out vq/ \\
        --resolution 32 --block-out-channels 16,32,64 --embed-dim 4 --codebook-size 256 --steps 600
"""

from __future__ import annotations

if not __package__:  # run as a file (`python data_prep/train_vq.py`): import it as part of the package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "data_prep"

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from model.vq import build_vq, decode_codes, downsample, encode_codes

from .cli import int_list, parse_with_config, run_tool, setup_logging
from .train_vae import load_images

log = logging.getLogger("data_prep.train_vq")


@torch.no_grad()
def evaluate(vq: Any, data: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Reconstruction MSE / PSNR (on [0, 1] pixels) through the codes, and codebook usage."""
    vq.eval()
    se, n, counts = 0.0, 0, torch.zeros(vq.config.num_vq_embeddings)
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        codes = encode_codes(vq, x)
        counts += torch.bincount(codes.flatten().cpu(), minlength=len(counts)).float()
        rec = decode_codes(vq, codes).clamp(-1, 1)
        se += F.mse_loss(rec.float().cpu(), x, reduction="sum").item()
        n += x.numel()
    mse = se / n  # on [-1, 1]; /4 on [0, 1]
    p = counts / counts.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
            "codes_used": int((counts > 0).sum()), "perplexity": perplexity}


def restart_dead_codes(vq: Any, used: torch.Tensor, h: torch.Tensor, g: torch.Generator) -> int:
    """Re-seed the codebook rows not in `used` with random encoder vectors of `h` [b, D, h, w]."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(len(pool), (len(dead),), generator=g)
    with torch.no_grad():
        vq.quantize.embedding.weight[dead] = pool[pick].to(vq.quantize.embedding.weight.dtype)
    return len(dead)


def train(args: argparse.Namespace) -> dict:
    """Load data, train, save; returns a summary dict (also written as train_vq_report.json)."""
    torch.manual_seed(args.seed)
    data, skipped = load_images(args.input, args.format, args.resolution, args.max_images, args.min_size)
    n_val = min(max(len(data) // 20, 1), 256) if len(data) > 1 else 0
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    val, train_set = data[perm[:n_val]], data[perm[n_val:]]
    blocks = int_list(args.block_out_channels)
    vq = build_vq(args.resolution, blocks, args.embed_dim, args.codebook_size, args.layers_per_block,
                  args.norm_num_groups, not args.no_mid_attention)
    f = downsample(vq)
    if args.resolution % f:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the downsampling factor {f}")
    side = args.resolution // f
    log.info("%d train / %d val images (skipped %s); VQ %.2fM params, %dx%d -> %dx%d codes of %d", len(train_set),
             n_val, skipped or "none", sum(p.numel() for p in vq.parameters()) / 1e6, args.resolution,
             args.resolution, side, side, args.codebook_size)
    opt = torch.optim.AdamW(vq.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))
    g = torch.Generator().manual_seed(args.seed + 1)
    used = torch.zeros(args.codebook_size, dtype=torch.bool)
    with torch.no_grad():  # data-dependent init: codes start on encoder outputs, not far from all of them
        restart_dead_codes(vq, used, vq.encode(train_set[:512]).latents, g)
    t0, step, restarted = time.time(), 0, 0
    vq.train()
    for step in range(1, args.steps + 1):
        x = train_set[torch.randint(len(train_set), (min(args.batch_size, len(train_set)),), generator=g)]
        h = vq.encode(x).latents  # [b, D, h, w]
        quant, commit, (_, _, idx) = vq.quantize(h)
        used[idx.flatten()] = True
        rec = vq.decode(quant, force_not_quantize=True).sample
        rec_loss = F.mse_loss(rec, x) + args.l1_weight * F.l1_loss(rec, x)
        loss = rec_loss + commit.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.restart_every and step % args.restart_every == 0 and step <= args.steps * 0.8:
            restarted += restart_dead_codes(vq, used, h, g)
            used[:] = False
        if step % args.log_every == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f rec %.4f vq %.4f lr %.2e %.1fs", step, args.steps, loss.item(),
                     rec_loss.item(), commit.mean().item(), sched.get_last_lr()[0], time.time() - t0)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log.info("stopping at step %d: --max-seconds %s reached", step, args.max_seconds)
            break
    vq.eval()
    metrics = evaluate(vq, val if n_val else train_set[:256], args.batch_size)
    out = Path(args.out)
    vq.save_pretrained(out)
    summary = {"steps": step, "train_seconds": round(time.time() - t0, 1), "images": len(train_set),
               "val_images": n_val, "skipped": skipped, "codebook_size": args.codebook_size,
               "code_grid": [side, side], "codes_restarted": restarted, "val_mse": metrics["mse"],
               "val_psnr_db": metrics["psnr"], "val_codes_used": metrics["codes_used"],
               "val_code_perplexity": metrics["perplexity"], "final_loss": loss.item()}
    (out / "train_vq_report.json").write_text(json.dumps(summary, indent=2))
    log.info("saved %s: %dx%d codes, val PSNR %.2f dB, %d/%d codes used", out, side, side, metrics["psnr"],
             metrics["codes_used"], args.codebook_size)
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of option: value defaults")
    ap.add_argument("--input", nargs="+", required=True, help="images: manifest, tar, parquet, folder")
    ap.add_argument("--format", default="auto", choices=["auto", "manifest", "tar", "parquet", "folder"])
    ap.add_argument("--out", required=True, help="folder for save_pretrained")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--min-size", type=int, default=0, help="skip images with a smaller short side")
    ap.add_argument("--block-out-channels", default="16,32,64", help="widths per level; levels-1 = log2(downsampling)")
    ap.add_argument("--embed-dim", type=int, default=4, help="codebook vector size (small dims keep codes in use)")
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--norm-num-groups", type=int, default=None, help="default: largest of 32..1 dividing all widths")
    ap.add_argument("--no-mid-attention", action="store_true", help="drop the attention in the mid block")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--l1-weight", type=float, default=0.0, help="weight of an extra L1 reconstruction term")
    ap.add_argument("--restart-every", type=int, default=25, help="re-seed codes unused for this many steps (0: never)")
    ap.add_argument("--max-images", type=int, default=100_000, help="images loaded into memory")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the training summary (also saved as train_vq_report.json)."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    return train(args)


def cli() -> None:
    """Console entry point: errors a user must fix print as one line."""
    run_tool(main, "train_vq")


if __name__ == "__main__":
    cli()
