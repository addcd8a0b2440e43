"""The training loop shared by `train_vae` (AutoencoderKL) and `train_vq` (VQModel).

Both trainers load every usable image of their inputs into memory, hold out a validation split,
train a small diffusers autoencoder with AdamW (warmup + cosine to 10%, grad-norm clip 1.0) on an
MSE (+ optional L1) reconstruction loss plus the model's own term, then save it with
save_pretrained next to a JSON report. A `Recipe` is the model's part: how it is built, its loss
term, any per-step upkeep, and what its report adds.
"""

from __future__ import annotations

import abc
import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import images, readers

Option = tuple[str, dict[str, Any]]  # (flag, argparse keyword arguments)


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


def autoencoder_kwargs(resolution: int, block_out_channels: Sequence[int], layers_per_block: int = 1,
                       norm_num_groups: int | None = None, mid_attention: bool = True) -> dict[str, Any]:
    """Constructor arguments AutoencoderKL and VQModel share: RGB in/out, one level per width."""
    if norm_num_groups is None:  # largest group count that divides every width
        norm_num_groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in block_out_channels))
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, sample_size=resolution,
                mid_block_add_attention=mid_attention)


@torch.no_grad()
def reconstruction_metrics(reconstruct: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                           batch_size: int) -> dict[str, float]:
    """MSE and PSNR (on [0, 1] pixels) of `reconstruct` over `data` [N, 3, R, R], batch by batch."""
    se, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        rec = reconstruct(x).clamp(-1, 1)
        se += F.mse_loss(rec.float().cpu(), x, reduction="sum").item()
        n += x.numel()
    mse = se / n  # on [-1, 1]; /4 on [0, 1]
    return {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}


class Recipe(abc.ABC):
    """One autoencoder's part of the shared training: model, loss term, upkeep and report entries."""

    name = ""  # in the first log line, e.g. "VAE"
    report_file = ""  # written next to the saved model
    term_format = ""  # the model's loss term in the step log line, e.g. "kl/pix %.3f"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @abc.abstractmethod
    def build(self) -> Any:
        """A fresh model for `self.args` (ValueError when the options do not fit together)."""

    @abc.abstractmethod
    def output_shape(self) -> str:
        """What an image becomes, for the first log line, e.g. '8x8x4'."""

    def start(self, model: Any, train_set: torch.Tensor, g: torch.Generator) -> None:
        """Called once before the first step."""

    @abc.abstractmethod
    def loss_terms(self, model: Any, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """(reconstruction of x, the model's term added to the loss, the value logged for it)."""

    def after_step(self, model: Any, step: int, g: torch.Generator) -> None:
        """Called after each optimizer and scheduler step."""

    @abc.abstractmethod
    def finish(self, model: Any, train_set: torch.Tensor, val: torch.Tensor,
               n_val: int) -> tuple[dict[str, Any], str, tuple]:
        """After training (model in eval mode): (report entries, saved-line format, its arguments)."""


def train_autoencoder(args: argparse.Namespace, recipe: Recipe, log: logging.Logger) -> dict:
    """Load data, train `recipe`'s model, save it with its report; returns the report."""
    torch.manual_seed(args.seed)
    data, skipped = load_images(args.input, args.format, args.resolution, args.max_images, args.min_size)
    n_val = min(max(len(data) // 20, 1), 256) if len(data) > 1 else 0
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    val, train_set = data[perm[:n_val]], data[perm[n_val:]]
    model = recipe.build()
    log.info("%d train / %d val images (skipped %s); %s %.2fM params, %dx%d -> %s", len(train_set), n_val,
             skipped or "none", recipe.name, sum(p.numel() for p in model.parameters()) / 1e6, args.resolution,
             args.resolution, recipe.output_shape())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))
    g = torch.Generator().manual_seed(args.seed + 1)
    recipe.start(model, train_set, g)
    t0, step = time.time(), 0
    model.train()
    for step in range(1, args.steps + 1):
        x = train_set[torch.randint(len(train_set), (min(args.batch_size, len(train_set)),), generator=g)]
        rec, term, logged = recipe.loss_terms(model, x, g)
        rec_loss = F.mse_loss(rec, x) + args.l1_weight * F.l1_loss(rec, x)
        loss = rec_loss + term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recipe.after_step(model, step, g)
        if step % args.log_every == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f rec %.4f " + recipe.term_format + " lr %.2e %.1fs", step, args.steps,
                     loss.item(), rec_loss.item(), logged.item(), sched.get_last_lr()[0], time.time() - t0)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log.info("stopping at step %d: --max-seconds %s reached", step, args.max_seconds)
            break
    model.eval()
    entries, saved_format, saved_args = recipe.finish(model, train_set, val, n_val)
    out = Path(args.out)
    model.save_pretrained(out)
    summary = {"steps": step, "train_seconds": round(time.time() - t0, 1), "images": len(train_set),
               "val_images": n_val, "skipped": skipped, **entries, "final_loss": loss.item()}
    (out / recipe.report_file).write_text(json.dumps(summary, indent=2))
    log.info("saved %s: " + saved_format, out, *saved_args)
    return summary


def build_trainer_parser(description: str, extra: dict[str, Sequence[Option]]) -> argparse.ArgumentParser:
    """The trainers' shared options; `extra[flag]` (a model's own options) are added right after `flag`."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(flag: str, **kwargs: Any) -> None:
        ap.add_argument(flag, **kwargs)
        for other, other_kwargs in extra.get(flag, ()):
            ap.add_argument(other, **other_kwargs)

    add("--config", help="YAML file of option: value defaults")
    add("--input", nargs="+", required=True, help="images: manifest, tar, parquet, folder")
    add("--format", default="auto", choices=["auto", "manifest", "tar", "parquet", "folder"])
    add("--out", required=True, help="folder for save_pretrained")
    add("--resolution", type=int, default=32)
    add("--min-size", type=int, default=0, help="skip images with a smaller short side")
    add("--block-out-channels", default="16,32,64", help="widths per level; levels-1 = log2(downsampling)")
    add("--layers-per-block", type=int, default=1)
    add("--norm-num-groups", type=int, default=None, help="default: largest of 32..1 dividing all widths")
    add("--no-mid-attention", action="store_true", help="drop the attention in the mid block")
    add("--steps", type=int, default=600)
    add("--lr", type=float, default=2e-3)
    add("--batch-size", type=int, default=32)
    add("--l1-weight", type=float, default=0.0, help="weight of an extra L1 reconstruction term")
    add("--max-images", type=int, default=100_000, help="images loaded into memory")
    add("--max-seconds", type=float, default=0.0, help="stop training after this long (0: no limit)")
    add("--seed", type=int, default=0)
    add("--log-every", type=int, default=50)
    return ap
