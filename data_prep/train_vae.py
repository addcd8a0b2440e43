"""Train a small diffusers AutoencoderKL on an image set and save it with save_pretrained.

Offline we have no pretrained VAE, so the pipeline trains its own (as the paper does, at a far
smaller scale). Loss: MSE (+ optional L1) reconstruction of a posterior sample + a small KL term
(per pixel). After training, `scaling_factor` = 1 / std of posterior samples on up to
`--scale-samples` images (optionally `shift_factor` = their mean) is written into the saved config,
so the latents the transformer sees have unit variance.

Images come from any input encode_latents reads (manifest, tar, parquet, folder); captions are
ignored and bad images skipped. Options may also come from `--config vae.yaml`.

    python -m data_prep.train_vae --input data/train/manifest.jsonl --out vae/ \\
        --resolution 32 --block-out-channels 16,32,64 --latent-channels 4 --steps 600
"""

from __future__ import annotations

if not __package__:  # run as a file (`python data_prep/train_vae.py`): import it as part of the package
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
from typing import Sequence

import torch
import torch.nn.functional as F

from . import images, readers
from .cli import int_list, parse_with_config, run_tool, setup_logging

log = logging.getLogger("data_prep.train_vae")


def load_images(inputs: Sequence[str], fmt: str, resolution: int, max_images: int,
                min_size: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """All usable images of `inputs` as one tensor [N, 3, R, R] in [-1, 1], plus skip counts."""
    source = readers.image_source(inputs, fmt)
    pixels, skipped = [], {}
    for rec in source.records(source.units()):
        if len(pixels) >= max_images:
            break
        try:
            if rec.error or rec.read is None:
                raise images.BadImage(rec.error or readers.MISSING_IMAGE)
            try:
                data = rec.read()
            except Exception as e:  # noqa: BLE001 - counted like in encode_latents
                raise images.BadImage(images.UNREADABLE, str(e)) from None
            pixels.append(images.load_image(data, resolution, min_size)[0])
        except images.BadImage as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    if not pixels:
        raise ValueError(f"no usable images in {list(inputs)} (skipped: {skipped})")
    return torch.stack(pixels), skipped


def build_vae(resolution: int, block_out_channels: Sequence[int], latent_channels: int,
              layers_per_block: int = 1, norm_num_groups: int | None = None, mid_attention: bool = True):
    """A fresh AutoencoderKL with 2**(len(block_out_channels)-1) downsampling."""
    from diffusers import AutoencoderKL

    if norm_num_groups is None:  # largest group count that divides every width
        norm_num_groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in block_out_channels))
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
        sample_size=resolution, mid_block_add_attention=mid_attention)


@torch.no_grad()
def latent_statistics(vae, data: torch.Tensor, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over all elements of posterior samples of `data` [N, 3, R, R]."""
    g = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(data), batch_size):
        z = vae.encode(data[i:i + batch_size]).latent_dist.sample(generator=g).double()  # [b, C, h, w]
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 1e-12))


@torch.no_grad()
def evaluate(vae, data: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Reconstruction MSE and PSNR (on [0, 1] pixels) from posterior means."""
    vae.eval()
    se, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        se += F.mse_loss(rec, x, reduction="sum").item()
        n += x.numel()
    mse = se / n  # on [-1, 1]; /4 on [0, 1]
    return {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}


def train(args: argparse.Namespace) -> dict:
    """Load data, train, compute the scaling factor, save; returns a summary dict."""
    torch.manual_seed(args.seed)
    data, skipped = load_images(args.input, args.format, args.resolution, args.max_images, args.min_size)
    n_val = min(max(len(data) // 20, 1), 256) if len(data) > 1 else 0
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    val, train_set = data[perm[:n_val]], data[perm[n_val:]]
    blocks = int_list(args.block_out_channels)
    vae = build_vae(args.resolution, blocks, args.latent_channels, args.layers_per_block,
                    args.norm_num_groups, not args.no_mid_attention)
    down = 2 ** (len(blocks) - 1)
    log.info("%d train / %d val images (skipped %s); VAE %.2fM params, %dx%d -> %dx%dx%d", len(train_set),
             n_val, skipped or "none", sum(p.numel() for p in vae.parameters()) / 1e6, args.resolution,
             args.resolution, args.resolution // down, args.resolution // down, args.latent_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))
    g = torch.Generator().manual_seed(args.seed + 1)
    t0, step, pix = time.time(), 0, 3 * args.resolution ** 2
    vae.train()
    for step in range(1, args.steps + 1):
        x = train_set[torch.randint(len(train_set), (min(args.batch_size, len(train_set)),), generator=g)]
        post = vae.encode(x).latent_dist  # mean/std [b, C, h, w]
        rec = vae.decode(post.sample(generator=g)).sample  # [b, 3, R, R]
        rec_loss = F.mse_loss(rec, x) + args.l1_weight * F.l1_loss(rec, x)
        kl = post.kl().mean() / pix  # KL per pixel
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f rec %.4f kl/pix %.3f lr %.2e %.1fs", step, args.steps, loss.item(),
                     rec_loss.item(), kl.item(), sched.get_last_lr()[0], time.time() - t0)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log.info("stopping at step %d: --max-seconds %s reached", step, args.max_seconds)
            break
    vae.eval()
    sample = train_set[: args.scale_samples]
    mean, std = latent_statistics(vae, sample, args.batch_size, args.seed)
    shift = mean if args.compute_shift else None
    scale = 1.0 / std
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    metrics = evaluate(vae, val if n_val else sample, args.batch_size)
    out = Path(args.out)
    vae.save_pretrained(out)
    summary = {"steps": step, "train_seconds": round(time.time() - t0, 1), "images": len(train_set),
               "val_images": n_val, "skipped": skipped, "scaling_factor": scale, "shift_factor": shift,
               "latent_shape": [args.latent_channels, args.resolution // down, args.resolution // down],
               "val_mse": metrics["mse"], "val_psnr_db": metrics["psnr"], "final_loss": loss.item()}
    (out / "train_vae_report.json").write_text(json.dumps(summary, indent=2))
    log.info("saved %s: scaling_factor %.4f, val PSNR %.2f dB", out, scale, metrics["psnr"])
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
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--norm-num-groups", type=int, default=None, help="default: largest of 32..1 dividing all widths")
    ap.add_argument("--no-mid-attention", action="store_true", help="drop the attention in the mid block")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-pixel KL")
    ap.add_argument("--l1-weight", type=float, default=0.0, help="weight of an extra L1 reconstruction term")
    ap.add_argument("--max-images", type=int, default=100_000, help="images loaded into memory")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--scale-samples", type=int, default=512, help="images used for the scaling factor")
    ap.add_argument("--compute-shift", action="store_true", help="also store shift_factor = latent mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the training summary (also saved as train_vae_report.json)."""
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    return train(args)


def cli() -> None:
    """Console entry point (`transfusion-train-vae`): errors a user must fix print as one line."""
    run_tool(main, "train_vae")


if __name__ == "__main__":
    cli()
