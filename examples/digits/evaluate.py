"""Evaluate a run on the embedded default: can the trained model draw digits and read them?

    python -m examples.digits.evaluate --run outputs/tiny --data outputs/embedded_default [--out RUN/eval]
        [--images-per-class 10] [--steps 50 --sampler ddim --cfg-scale 3] [--seed 0]

1. The run's latest checkpoint is converted into OUT/model (tokenizer and VAE copied in).
2. A digit classifier (RBF-kernel SVM on grayscale pixels at the VAE's resolution, the digits
   preprocessed exactly as the VAE sees them, background-subtracted and max-normalized per image;
   see classifier.features) is trained on the REAL held-out digits only; its
   stratified k-fold accuracy on them is reported, and so is the accuracy of the same folds on the
   VAE reconstructions of the held-out digits (the ceiling any generated image can reach with this
   VAE). It is never trained on generated images.
3. Caption -> image: N images per class from one caption template, decoded with the VAE, classified.
4. Image -> caption: held-out digits, VAE-encoded, captioned greedily; the digit is parsed from the text.
5. FD-digits: the Fréchet distance between generated and real held-out digits on the classifier's
   features (its 45 one-vs-one decision values; examples/digits/features.py), beside the same
   distance for the VAE reconstructions (what a perfect model reaches); CIDEr and BLEU-4 of the
   captions against every training template's caption of the digit (inference/text_scores.py).
6. OUT/grid.png (rows = classes), OUT/loss_curve.png (from RUN/metrics.jsonl), OUT/results.json,
   and OUT/digits.pt2 + OUT/manifest.jsonl, with which `python -m inference.evaluate OUT/model
   --manifest OUT/manifest.jsonl --feature-net OUT/digits.pt2` scores the model again (FD-digits,
   CIDEr / BLEU, accuracy) with the general command.

A run with `model.image_representation: tokens` (the discrete baseline) is evaluated the same way
with DATA/vq (data_prep.train_vq) in place of the VAE: images are VQ code grids, sampled token by
token with CFG on the logits (the diffusion settings do not apply) and decoded by the VQ model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from inference.image_scores import FeatureNet, Frechet
from inference.text_scores import caption_scores

from .classifier import (
    DIGIT_WORDS, DigitClassifier, features, load_pixels, parse_digit, per_class, read_metrics, save_class_grid,
    save_loss_curve, train_classifier,
)
from .features import save_feature_net

__all__ = ["DigitClassifier", "EvalSettings", "EvaluationError", "evaluate", "features", "load_pixels", "main",
           "parse_digit", "report"]

TARGETS = {"caption_to_image": 0.80, "image_to_caption": 0.90}


class EvaluationError(RuntimeError):
    """A run or data folder the evaluation cannot use; the message says what to run or fix."""


@dataclass
class EvalSettings:
    """What to generate and how (the CLI flags)."""

    images_per_class: int = 10
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 3.0
    seed: int = 0
    caption_images: int | None = None  # held-out digits to caption (None = all)
    max_caption_tokens: int = 16
    batch_size: int = 50
    cv_folds: int = 5


# ---- data ----------------------------------------------------------------------------------------


def check_folders(run: Path, data: Path) -> dict[str, Path]:
    """The files the evaluation needs, or an EvaluationError saying which command produces them."""
    prep = f"python -m examples.digits.prepare --out {data}"
    if not run.is_dir():
        raise EvaluationError(f"run folder '{run}' does not exist; train one with "
                              f"`python -m trainer.train --config configs/tiny.yaml` (or pass --run)")
    if not data.is_dir():
        raise EvaluationError(f"data folder '{data}' does not exist; prepare it with `{prep}` (or pass --data)")
    paths = {"heldout": data / "raw" / "heldout" / "manifest.jsonl", "train": data / "raw" / "train" / "manifest.jsonl",
             "tokenizer": data / "tokenizer" / "tokenizer.model", "vae": data / "vae", "vq": data / "vq"}
    for name in ("heldout", "tokenizer", "vae"):
        if not paths[name].exists():
            raise EvaluationError(f"'{data}' has no {paths[name].relative_to(data)}: the data preparation did not "
                                  f"finish; rerun `{prep}`")
    return paths


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a raw manifest with absolute image paths and integer labels."""
    rows = []
    for i, line in enumerate(open(path)):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}:{i + 1} is not valid JSON ({e}); rerun the data preparation") from None
            if "label" not in r or "path" not in r:
                raise EvaluationError(f"{path}:{i + 1} has no 'path' or 'label'; it is not an embedded-default manifest")
            r["file"] = path.parent / r["path"]
            if not r["file"].is_file():
                raise EvaluationError(f"{path}:{i + 1} names {r['file']}, which does not exist; rerun the data preparation")
            rows.append(r)
    if not rows:
        raise EvaluationError(f"{path} is empty")
    return rows


def pick_template(train_manifest: Path) -> tuple[str, bool]:
    """A caption template the training data never used if there is one (True), else the first."""
    from .prepare import TEMPLATES

    seen = {json.loads(line)["caption"] for line in open(train_manifest) if line.strip()} if train_manifest.exists() else set()
    unused = [t for t in TEMPLATES if not any(caption(t, d) in seen for d in range(10))]
    return (unused[0], True) if unused and seen else (TEMPLATES[0], False)


def caption(template: str, digit: int) -> str:
    """A caption of `digit` in the style of examples.digits.prepare (its word and its numeral)."""
    return template.format(name=DIGIT_WORDS[digit], digit=digit)


# ---- generation ----------------------------------------------------------------------------------


def generate_images(gen: Any, template: str, s: EvalSettings) -> tuple[torch.Tensor, list[int]]:
    """`images_per_class` latents per digit from its caption (mode image); row-major by class."""
    from inference.generate import GenerationConfig

    labels = [d for d in range(10) for _ in range(s.images_per_class)]
    prompts = [caption(template, d) for d in labels]
    latents = []
    for i in range(0, len(prompts), s.batch_size):
        cfg = GenerationConfig(mode="image", cfg_scale=s.cfg_scale, steps=s.steps, sampler=s.sampler, seed=s.seed + i)
        latents += [r.images[0] for r in gen.generate(prompts[i:i + s.batch_size], cfg)]
    return torch.stack(latents), labels


def generate_captions(gen: Any, latents: torch.Tensor, s: EvalSettings) -> list[str]:
    """A greedy caption for each latent (prompt = BOS, the image; mode caption)."""
    from inference.generate import GenerationConfig
    from inference.prompts import ImagePart

    cfg = GenerationConfig(mode="caption", temperature=0.0, max_new_tokens=s.max_caption_tokens, seed=s.seed)
    texts: list[str] = []
    for i in range(0, len(latents), s.batch_size):
        texts += [(r.text or "").strip() for r in gen.generate([[ImagePart(latent=z)] for z in latents[i:i + s.batch_size]], cfg)]
    return texts


# ---- the evaluation ------------------------------------------------------------------------------


def evaluate(run: str | Path, data: str | Path, out: str | Path | None = None,
             settings: EvalSettings | None = None) -> dict[str, Any]:
    """Run steps 1-5 (see the module docstring); returns what results.json holds."""
    from inference.convert import convert_checkpoint, read_train_configs, resolve_checkpoint
    from inference.generate import TransfusionGenerator
    from inference.loading import InferenceFolderError

    s = settings or EvalSettings()
    run, data = Path(run), Path(data)
    root = run.parent.parent if (run / "train_state.pt").is_file() else run  # a step_N folder -> its run
    out = Path(out) if out is not None else root / "eval"
    paths = check_folders(run, data)
    seconds: dict[str, float] = {}
    t0 = time.time()

    try:  # 1. convert
        tokens = read_train_configs(resolve_checkpoint(run))[0].image_representation == "tokens"
        if tokens and not paths["vq"].exists():
            raise EvaluationError(f"'{run}' reads images as VQ tokens but '{data}' has no vq/; train it with "
                                  f"`python -m data_prep.train_vq --input {paths['train']} --out {paths['vq']}`")
        codec = {"vq": paths["vq"]} if tokens else {"vae": paths["vae"]}
        inf = convert_checkpoint(run, out / "model", tokenizer=paths["tokenizer"], overwrite=True, **codec)
    except InferenceFolderError as e:
        raise EvaluationError(f"{e}\n(the trainer writes <output_dir>/checkpoints/step_N when checkpoint.enabled "
                              f"is true; is '{run}' a finished run?)") from None
    gen = TransfusionGenerator.from_folder(out / "model")
    size = gen.image_resolution()
    seconds["convert"] = time.time() - t0

    # 2. classifier on the real held-out digits (their latents are also the captioning prompts)
    t = time.time()
    rows = load_manifest(paths["heldout"])
    labels = np.array([r["label"] for r in rows])
    real = load_pixels([r["file"] for r in rows], size)
    with torch.no_grad():
        latents = torch.stack([gen.encode_image(str(r["file"])) for r in rows])
        recon = torch.cat([gen.decode_images(latents[i:i + 100]) for i in range(0, len(latents), 100)])
    clf, clf_report = train_classifier(features(real), labels, features(recon), s.cv_folds, s.seed)
    seconds["classifier"] = time.time() - t

    # 3. caption -> image
    t = time.time()
    template, held_out = pick_template(paths["train"])
    out.mkdir(parents=True, exist_ok=True)
    net = FeatureNet(save_feature_net(clf.model, out / "digits.pt2", size), size)
    gen_latents, gen_labels = generate_images(gen, template, s)
    images = gen.decode_images(gen_latents)
    img_pred = clf.predict(features(images))
    c2i = per_class(img_pred.tolist(), gen_labels) | {
        "template": template, "template_held_out": held_out,
        "prompts": [caption(template, d) for d in range(10)], "predictions": img_pred.tolist()}
    grid = save_class_grid(images, gen_labels, img_pred, s.images_per_class, out / "grid.png")
    seconds["caption_to_image"] = time.time() - t

    # 4. image -> caption
    t = time.time()
    pick = np.arange(len(rows)) if s.caption_images is None else _spread(labels, s.caption_images)
    texts = generate_captions(gen, latents[pick], s)
    parsed = [parse_digit(x) for x in texts]
    first_two = {int(k) for d in range(10) for k in pick[labels[pick] == d][:2]}  # examples: 2 per class
    i2c = per_class(parsed, labels[pick].tolist()) | {
        "unparsed": sum(p is None for p in parsed),
        "examples": [{"image": str(rows[k]["file"]), "label": int(labels[k]), "caption": x, "parsed": p}
                     for k, x, p in zip(pick.tolist(), texts, parsed) if k in first_two]}
    seconds["image_to_caption"] = time.time() - t

    # 5. FD-digits, CIDEr / BLEU
    t = time.time()
    fd = {**dict(zip(("generated", "vae_reconstructions"), frechet(net, real, [images, recon]))),
          "real_digits": len(real), "generated_digits": len(images)}
    refs = references(template if held_out else None)
    cap_scores = caption_scores(dict(enumerate(texts)), {k: refs[int(labels[j])] for k, j in enumerate(pick.tolist())})
    write_manifest(out / "manifest.jsonl", rows, c2i["prompts"], s.images_per_class, refs)
    seconds["scores"] = time.time() - t

    # 6. loss curve, results
    metrics_path, loss_png, final = root / "metrics.jsonl", None, None
    if metrics_path.is_file() and (metric_rows := read_metrics(metrics_path)):
        loss_png = str(save_loss_curve(metric_rows, out / "loss_curve.png", f"{run} (step {inf.source['step']})"))
        final = ([r for r in metric_rows if r["step"] <= (inf.source["step"] or 0)] or metric_rows)[-1]
    seconds["total"] = time.time() - t0
    results = {
        "run": str(run), "checkpoint": inf.source["checkpoint"], "step": inf.source["step"], "data": str(data),
        "settings": asdict(s), "classifier": clf_report, "caption_to_image": c2i, "image_to_caption": i2c,
        "fd_digits": fd, "captions": cap_scores, "targets": TARGETS, "passed": {k: (c2i if k == "caption_to_image" else i2c)["accuracy"] >= v for k, v in TARGETS.items()},
        "final_metrics": final, "files": {"model": str(out / "model"), "grid": str(grid), "loss_curve": loss_png,
                                          "results": str(out / "results.json"), "feature_net": str(out / "digits.pt2"),
                                          "manifest": str(out / "manifest.jsonl")},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def frechet(net: FeatureNet, real: torch.Tensor, others: list[torch.Tensor]) -> list[float]:
    """FD-digits of each image set [N, 3, H, W] in [0, 1] against `real` (inference.image_scores.Frechet);
    the real features are extracted once (the metric keeps them across `reset`)."""
    f = Frechet("fd_digits", net, resolution=real.shape[-1])
    f.add(real, real=True)
    out = []
    for other in others:
        f.metric.reset()
        f.add(other, real=False)
        out.append(f.compute())
    return out


def references(held_out: str | None) -> dict[int, list[str]]:
    """Reference captions per digit: its caption in every template training used."""
    from .prepare import TEMPLATES

    return {d: [caption(t, d) for t in TEMPLATES if t != held_out] for d in range(10)}


def write_manifest(path: Path, rows: list[dict[str, Any]], prompts: list[str], per_class: int,
                   refs: dict[int, list[str]]) -> Path:
    """inference.evaluate's manifest of this evaluation: the caption prompts (per_class per digit)
    and the real held-out digits with their reference captions."""
    with open(path, "w") as f:
        for d, p in enumerate(prompts):
            f.writelines(json.dumps({"caption": p, "label": d}) + "\n" for _ in range(per_class))
        for r in rows:
            f.write(json.dumps({"image": str(Path(r["file"]).resolve()), "label": int(r["label"]),
                                "references": refs[int(r["label"])]}) + "\n")
    return path


def _spread(labels: np.ndarray, n: int) -> np.ndarray:
    """n indices taking the classes in turn (first of each class, then second, ...), so a subset stays balanced."""
    rank, seen = np.zeros(len(labels), dtype=int), {}
    for i, y in enumerate(labels.tolist()):
        rank[i] = seen[y] = seen.get(y, -1) + 1
    return np.sort(np.lexsort((labels, rank))[:n])


def report(r: dict[str, Any]) -> str:
    """The short human-readable summary printed at the end of `make demo`."""
    c, c2i, i2c = r["classifier"], r["caption_to_image"], r["image_to_caption"]
    mark = {True: "meets", False: "BELOW"}

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    per = "  ".join(f"{k}:{v:.0%}" for k, v in c2i["per_class"].items())
    per_c = "  ".join(f"{k}:{v:.0%}" for k, v in i2c["per_class"].items())
    recon = c.get("cv_accuracy_on_vae_reconstructions")
    lines = [
        f"evaluation of {r['run']} at step {r['step']} ({r['seconds']['total']:.0f}s)",
        f"  classifier       {c['kind']}, trained on {c['train_size']} real held-out digits; {c['cv_folds']}-fold accuracy "
        f"{pct(c['cv_accuracy'])} on real digits" + (f", {pct(recon)} on their VAE reconstructions" if recon is not None else ""),
        f"  caption -> image {pct(c2i['accuracy'])} of {c2i['n']} ({mark[r['passed']['caption_to_image']]} the "
        f"{TARGETS['caption_to_image']:.0%} target); template \"{c2i['template']}\""
        f"{' (held out)' if c2i['template_held_out'] else ' (a training template: none is held out)'}",
        f"                   per class {per}",
        f"  image -> caption {pct(i2c['accuracy'])} of {i2c['n']} held-out digits ({mark[r['passed']['image_to_caption']]} "
        f"the {TARGETS['image_to_caption']:.0%} target; {i2c['unparsed']} captions name no single digit)",
        f"                   per class {per_c}",
    ]
    shown = {e["label"]: e for e in reversed(i2c["examples"])}
    if shown:
        lines.append("                   e.g. " + "; ".join(f"{d} -> \"{shown[d]['caption']}\"" for d in sorted(shown)[1::3]))
    fd, cap = r["fd_digits"], r["captions"]
    lines += [
        f"  FD-digits        {fd['generated']:.3g} for {fd['generated_digits']} generated vs {fd['real_digits']} real held-out "
        f"digits (VAE reconstructions: {fd['vae_reconstructions']:.3g}; lower is better)",
        f"  captions         CIDEr {cap['cider']:.3f}, BLEU-4 {cap['bleu4']:.3f} against the training templates' captions",
    ]
    f = r["files"]
    lines += [f"  grid             {f['grid']}", f"  loss curve       {f['loss_curve'] or '(no metrics.jsonl in the run)'}",
              f"  results          {f['results']}", f"  inference model  {f['model']}",
              f"  re-score with    python -m inference.evaluate {f['model']} --manifest {f['manifest']} --feature-net {f['feature_net']} "
              f"--steps {r['settings']['steps']} --sampler {r['settings']['sampler']} --cfg-scale {r['settings']['cfg_scale']:g}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m examples.digits.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="outputs/tiny", help="training output_dir (its latest checkpoint is evaluated) or one checkpoints/step_N folder")
    ap.add_argument("--data", default="outputs/embedded_default", help="the embedded default's data folder")
    ap.add_argument("--out", default=None, help="output folder (default: RUN/eval)")
    ap.add_argument("--images-per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="diffusion steps")
    ap.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caption-images", type=int, default=None, help="held-out digits to caption (default: all)")
    ap.add_argument("--batch-size", type=int, default=50, help="prompts per generation batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny on busy CPUs)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.images_per_class < 1 or (args.caption_images is not None and args.caption_images < 1):
        print("error: --images-per-class and --caption-images must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    settings = EvalSettings(args.images_per_class, args.steps, args.sampler, args.cfg_scale, args.seed,
                            args.caption_images, batch_size=args.batch_size)
    from inference.images import VAEError
    from inference.prompts import PromptError
    from inference.tokenizer import TokenizerError

    try:
        results = evaluate(args.run, args.data, args.out, settings)
    except (EvaluationError, VAEError, TokenizerError, PromptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
