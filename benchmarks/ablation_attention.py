"""The paper's Table 5 on the embedded default: bidirectional vs causal attention inside images.

Both variants are configs/tiny.yaml with `model.patch_size=1` (64 patches per 32 px digit instead of
the demo's 16, so that attention inside an image has something to do), trained the same number of
steps from `--seeds` seeds (`train.seed`: initialization and data order); they differ only in
`model.image_attention` (bidirectional | causal; attention FLOPs differ by <1%). Each run is
scored on what the held-out set says about images:

  - the held-out diffusion loss at fixed, stratified timesteps (the trainer's `eval/` metrics:
    the same noise and timesteps for every run; per bucket and the mean of 8 buckets), at the last step;
  - FD-digits (generated vs real held-out digits on the digit classifier's features) and caption ->
    image accuracy, from examples.digits.evaluate; image -> caption accuracy and CIDEr beside them.

Mean and standard deviation over seeds go to OUT/table5.md, OUT/table5.json and OUT/table5.png, with
the per-seed values; the verdict, paired by seed, says whether the difference exceeds its spread.

    python -m benchmarks.ablation_attention --quick                 # smoke run (minutes; says nothing)
    python -m benchmarks.ablation_attention --data outputs/embedded_default --steps 2500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ablations import train

VARIANTS = ("bidirectional", "causal")
METRICS = {  # key: (label, lower is better)
    "diffusion_loss": ("held-out diffusion loss (eps-MSE, mean of 8 fixed-t buckets)", True),
    "fd_digits": ("FD-digits (generated vs real)", True),
    "caption_to_image": ("caption -> image accuracy", False),
    "image_to_caption": ("image -> caption accuracy", False),
    "cider": ("CIDEr of captions", False),
    "caption_lm_loss": ("held-out caption LM loss (nats/token)", True),
}


@dataclass
class Settings:
    steps: int = 2500
    seeds: tuple[int, ...] = (0, 1, 2)
    images_per_class: int = 10
    caption_images: int | None = 200
    diffusion_steps: int = 50
    cfg_scale: float = 5.0
    vae_steps: int = 600


QUICK = Settings(steps=20, seeds=(0, 1), images_per_class=2, caption_images=20, diffusion_steps=5, vae_steps=40)


def overrides(variant: str, data: Path, run: Path, seed: int, s: Settings) -> list[str]:
    """configs/tiny.yaml overrides of one run: the demo's streams and held-out set under `data`."""
    shards = data / "shards"
    return [
        f"data.streams=[{{path: {shards / 'images'}, kind: image, proportion: 4.0}}, {{path: {shards / 'text'}, kind: text, proportion: 1.0}}]",
        f"eval.streams=[{{path: {shards / 'heldout' / 'images'}, kind: image, proportion: 4.0}}, "
        f"{{path: {shards / 'heldout' / 'text'}, kind: text, proportion: 1.0}}]",
        f"eval.every={max(1, s.steps // 5)}", "model.patch_size=1", f"model.image_attention={variant}",
        f"train.seed={seed}", f"train.steps={s.steps}", f"optim.warmup_steps={min(20, max(1, s.steps // 10))}",
        f"train.output_dir={run}", "logging.wandb=disabled", f"logging.log_every={max(1, s.steps // 10)}",
        "checkpoint.interval=0", "checkpoint.resume=none",
    ]


def run_one(variant: str, seed: int, data: Path, out: Path, s: Settings) -> dict[str, Any]:
    """Train one (variant, seed), evaluate it; its row of per-seed values."""
    from examples.digits.classifier import read_metrics
    from examples.digits.evaluate import EvalSettings, evaluate

    run = out / f"{variant}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train(overrides(variant, data, run, seed, s), run / "train.log")
    t_train = time.time() - t0
    ev = evaluate(run, data, run / "eval", EvalSettings(images_per_class=s.images_per_class, steps=s.diffusion_steps,
                                                         cfg_scale=s.cfg_scale, caption_images=s.caption_images, seed=0))
    rows = read_metrics(run / "metrics.jsonl")
    last = [r for r in rows if "eval/diffusion_loss" in r][-1]
    buckets = sorted((k for k in last if k.startswith("eval/diffusion_loss_t")), key=lambda k: int(k.split("_t")[1].split("-")[0]))
    return {
        "variant": variant, "seed": seed, "steps": s.steps,
        "diffusion_loss": last["eval/diffusion_loss"], "buckets": {k.split("loss_")[1]: last[k] for k in buckets},
        "caption_lm_loss": last.get("eval/caption_lm_loss"), "fd_digits": ev["fd_digits"]["generated"],
        "fd_digits_vae_floor": ev["fd_digits"]["vae_reconstructions"],
        "caption_to_image": ev["caption_to_image"]["accuracy"], "image_to_caption": ev["image_to_caption"]["accuracy"],
        "cider": ev["captions"]["cider"], "train_seconds": round(t_train, 1), "eval_seconds": round(time.time() - t0 - t_train, 1),
        "curve": [(r["step"], r["eval/diffusion_loss"]) for r in rows if "eval/diffusion_loss" in r],
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and metric: mean, std (ddof 1) and the values over seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        if mine:
            out[v] = {}
            for k in METRICS:
                x = np.array([r[k] for r in mine if r[k] is not None], dtype=float)
                out[v][k] = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "values": x.tolist()}
    return out


def verdict(rows: list[dict[str, Any]], key: str) -> str:
    """Which variant is better on `key`, paired by seed (a seed fixes initialization and data order
    for both variants), and whether the mean difference exceeds 2 standard errors of it."""
    by_seed = {(r["variant"], r["seed"]): r[key] for r in rows if r[key] is not None}
    seeds = sorted({s for v, s in by_seed if v == "bidirectional"} & {s for v, s in by_seed if v == "causal"})
    if len(seeds) < 2:
        return "n/a (fewer than 2 paired seeds)"
    diff = np.array([by_seed[("causal", s)] - by_seed[("bidirectional", s)] for s in seeds])
    gap, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    better = "bidirectional" if (gap > 0) == METRICS[key][1] else "causal"
    if abs(gap) <= 2 * se:
        return f"not resolved (causal - bidirectional = {gap:+.3g}, 2 SE = {2 * se:.2g})"
    return f"{better} better (causal - bidirectional = {gap:+.3g}, 2 SE = {2 * se:.2g})"


def write_report(out: Path, rows: list[dict[str, Any]], s: Settings, quick: bool) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    lines = [f"# Table 5: bidirectional vs causal attention inside images ({'QUICK smoke run: says nothing' if quick else 'full run'})",
             "", f"configs/tiny.yaml with 64 patches per image (patch_size 1), {s.steps} steps per run, seeds {list(s.seeds)}; "
             "mean ± std over seeds (per-seed values in table5.json).", "",
             "| metric | bidirectional | causal | verdict |", "|---|---|---|---|"]
    for k, (label, lower) in METRICS.items():
        cells = [f"{summary[v][k]['mean']:.4g} ± {summary[v][k]['std']:.2g}" if v in summary else "n/a" for v in VARIANTS]
        lines.append(f"| {label} ({'lower' if lower else 'higher'} is better) | {cells[0]} | {cells[1]} | {verdict(rows, k)} |")
    floor = np.mean([r["fd_digits_vae_floor"] for r in rows])
    lines += ["", f"FD-digits of the VAE reconstructions themselves (what a perfect model reaches): {floor:.3g}.",
              "Verdict: paired by seed; a difference counts as resolved when its mean over seeds exceeds 2 standard errors.",
              f"Settings: {json.dumps(asdict(s))}"]
    paths = {"md": out / "table5.md", "json": out / "table5.json", "png": out / "table5.png"}
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps({"quick": quick, "settings": asdict(s), "summary": summary, "rows": rows}, indent=2) + "\n")
    keys = ["diffusion_loss", "fd_digits", "caption_to_image"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(15, 3.6))
    for ax, k in zip(axes, keys):
        for i, v in enumerate(VARIANTS):
            if v in summary:
                vals = summary[v][k]["values"]
                ax.bar(i, summary[v][k]["mean"], 0.6, yerr=summary[v][k]["std"], capsize=4, alpha=0.6)
                ax.plot([i] * len(vals), vals, "k.", markersize=6)
        ax.set_xticks(range(len(VARIANTS)), VARIANTS)
        ax.set_title(METRICS[k][0], fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        if mine:
            names = list(mine[0]["buckets"])
            vals = np.array([[r["buckets"][b] for b in names] for r in mine])
            ax.errorbar(range(len(names)), vals.mean(0), yerr=vals.std(0), marker=".", capsize=3, label=v)
            ax.set_xticks(range(len(names)), names, rotation=45, fontsize=6)
    ax.set_yscale("log")
    ax.set_title("held-out eps-MSE per timestep bucket", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation_attention", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-run sizes (minutes; says nothing about quality)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--seeds", default=None, help="comma-separated train.seed values (default 0,1,2)")
    ap.add_argument("--data", default=None, help="the embedded default's data folder (made with examples.digits.prepare if missing)")
    ap.add_argument("--out", default=None, help="output folder (default outputs/ablation_attention[_quick])")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.steps is not None:
        s.steps = args.steps
    if args.seeds:
        s.seeds = tuple(int(x) for x in args.seeds.split(","))
    if s.steps < 1 or not s.seeds:
        print("error: --steps must be >= 1 and --seeds non-empty", file=sys.stderr)
        return 2
    out = Path(args.out or ("outputs/ablation_attention_quick" if args.quick else "outputs/ablation_attention"))
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    t0 = time.time()
    if not (data / "embedded_default.json").is_file():
        from examples.digits import prepare

        prepare.run(data, vae_steps=s.vae_steps)
    rows = []
    for seed in s.seeds:  # seeds outermost: a run cut short still has both variants of its first seeds
        for v in VARIANTS:
            rows.append(run_one(v, seed, data, out, s))
            r = rows[-1]
            print(f"[{v} seed {seed}] diffusion {r['diffusion_loss']:.4f}  FD-digits {r['fd_digits']:.3g}  "
                  f"caption->image {r['caption_to_image']:.1%}  image->caption {r['image_to_caption']:.1%}  "
                  f"({r['train_seconds']:.0f}s train, {r['eval_seconds']:.0f}s eval)", flush=True)
            (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    files = write_report(out, rows, s, args.quick)
    print(files["md"].read_text())
    print(f"table: {files['md']}  json: {files['json']}  plot: {files['png']}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
