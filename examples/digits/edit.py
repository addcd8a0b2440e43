"""Image editing with ground truth on the embedded digits: the paper's editing fine-tune, at CPU size.

Edits whose correct result is computable (EDITS: mirror, rotate a quarter turn, flip upside down,
thicken; not colour inversion: the demo's VAE, trained on white-on-black digits, decodes an inverted
digit at ~4 dB, so the metric would measure the VAE)
turn each 32 px digit into an editing triple: the source digit (a condition image), the instruction
(context text) and the edited digit (generated). Steps:

1. triples from the training digits (`--train-per-edit` each) and held-out ones, written as PNGs
   with an edit manifest, encoded by `data_prep.encode_documents --format edit`;
2. a fine-tune of the demo's checkpoint on them (configs/edit_tiny.yaml: `checkpoint.init_from`,
   edits mixed with the demo's caption-image pairs and text so those skills are kept);
3. both models, before and after, edit the held-out digits (image mode, two guidance scales) and
   are scored against the true edit: pixel PSNR, the "copy the input" baseline's PSNR, the VAE's
   own ceiling (the true edit encoded and decoded), and digit classifier agreement with the source
   digit (the output un-edited first where the edit has an inverse; the true edit's agreement is
   the ceiling).

    python -m examples.digits.edit --data outputs/embedded_default \\
        --base outputs/tiny/checkpoints/step_00006000 --out outputs/edit_tiny

Writes OUT/results.json, OUT/results.md and OUT/samples.png (per edit: source, true edit, before,
after). `make edit-demo` runs it after `make demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("examples.digits.edit")
RESOLUTION = 32
DEFAULT_DATA, DEFAULT_OUT = "outputs/embedded_default", "outputs/edit_tiny"  # as configs/edit_tiny.yaml names them
Edit = Callable[[torch.Tensor], torch.Tensor]  # pixels [..., H, W] in [0, 1] -> the same shape


def _thicken(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, 1, *x.shape[-2:])
    return F.max_pool2d(flat, 3, stride=1, padding=1).reshape(x.shape)


# name -> (instruction, edit, inverse or None); digits are white strokes on black
EDITS: dict[str, tuple[str, Edit, Edit | None]] = {
    "mirror": ("mirror the digit", lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "rotate": ("rotate the digit a quarter turn", lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
    "flip": ("flip the digit upside down", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "thicken": ("make the strokes thicker", _thicken, None),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [N, 3, H, W] images in [0, 1]."""
    mse = ((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def write_triples(data: Path, out: Path, split: str, per_edit: int | None) -> tuple[Path, list[dict]]:
    """The split's digits (preprocessed to 32 px) and their edits as PNGs + an edit manifest."""
    from inference.images import preprocess_image_file, save_pngs

    manifest = data / "raw" / split / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    folder = out / "triples" / split
    entries = []
    for k, (name, (instruction, edit, _)) in enumerate(EDITS.items()):
        picked = rows if per_edit is None else rows[k::len(EDITS)][:per_edit]  # each digit under one edit
        for r in picked:
            src = folder / "source" / f"{r['key']}.png"
            dst = folder / name / f"{r['key']}.png"
            if not dst.exists():
                pixels = (preprocess_image_file(manifest.parent / r["path"], RESOLUTION) + 1) / 2  # [3, R, R]
                save_pngs(torch.stack([pixels, edit(pixels)]), [src, dst])
            entries.append({"key": f"{r['key']}/{name}", "source": str(src), "instruction": instruction,
                            "target": str(dst), "edit": name, "label": r["label"]})
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path, entries


def encode(manifest: Path, shards: Path, data: Path) -> dict:
    from data_prep import encode_documents

    encode_documents.main(["--format", "edit", "--input", str(manifest), "--out", str(shards), "--key-field", "key",
                           "--vae", str(data / "vae"), "--tokenizer", str(data / "tokenizer" / "tokenizer.model"),
                           "--resolution", str(RESOLUTION), "--min-size", "16", "--batch-size", "64",
                           "--chunk-size", "2000", "--rank", "0", "--world-size", "1"])
    return json.loads((shards / "report.json").read_text())


def fine_tune(config: Path, base: Path, data: Path, out: Path, steps: int | None) -> Path:
    """Train `config` (configs/edit_tiny.yaml) from `base`, its shard paths moved under `data` and
    `out`; returns the final checkpoint (a rerun resumes an interrupted fine-tune)."""
    import yaml

    from trainer.train import main as train_main

    cfg = yaml.safe_load(config.read_text())
    for section in (cfg["data"], cfg["eval"]):
        for stream in section["streams"]:
            stream["path"] = stream["path"].replace(DEFAULT_DATA, str(data)).replace(DEFAULT_OUT, str(out))
    cfg["checkpoint"]["init_from"], cfg["train"]["output_dir"] = str(base), str(out / "run")
    if steps is not None:
        cfg["train"]["steps"] = steps
    resolved = out / "edit_config.yaml"
    resolved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if train_main(["--config", str(resolved)]) != 0:
        raise SystemExit("the fine-tune failed (see above)")
    return sorted((out / "run" / "checkpoints").glob("step_*"))[-1]


def edit_images(gen: Any, entries: list[dict], settings: argparse.Namespace) -> torch.Tensor:
    """Each entry's source edited by its instruction: decoded pixels [N, 3, R, R] in [0, 1]."""
    from inference import ImagePart

    tok = gen.tokenizer
    out = []
    for i in range(0, len(entries), settings.batch):
        batch = entries[i: i + settings.batch]
        prompts = [[ImagePart(path=e["source"]), tok.encode_prompt(e["instruction"])] for e in batch]
        results = gen.generate(prompts, mode="image", steps=settings.steps, sampler="ddim", cfg_scale=settings.cfg_scale,
                               image_cfg_scale=settings.image_cfg_scale, seeds=[settings.seed + i + j for j in range(len(batch))])
        out.append(gen.decode_images(torch.stack([r.images[0] for r in results])))
    return torch.cat(out)


def score(model_folder: Path, entries: list[dict], truth: torch.Tensor, clf: Any, settings: argparse.Namespace
          ) -> tuple[dict[str, dict], torch.Tensor]:
    """Per edit: mean PSNR against the true edit and classifier agreement with the source digit."""
    from inference.generate import TransfusionGenerator

    gen = TransfusionGenerator.from_folder(model_folder)
    images = edit_images(gen, entries, settings)
    return summarize(images, entries, truth, clf), images


def summarize(images: torch.Tensor, entries: list[dict], truth: torch.Tensor, clf: Any) -> dict[str, dict]:
    from .classifier import features

    out = {}
    labels = np.array([e["label"] for e in entries])
    for name, (_, _, inverse) in EDITS.items():
        idx = [k for k, e in enumerate(entries) if e["edit"] == name]
        x = images[idx]
        readable = inverse(x) if inverse is not None else x
        agree = float((clf.predict(features(readable)) == labels[idx]).mean())
        out[name] = {"psnr": float(psnr(x, truth[idx]).mean()), "classifier_agreement": agree, "n": len(idx)}
    return out


def evaluate(base_folder: Path, tuned_folder: Path, data: Path, entries: list[dict], out: Path,
             settings: argparse.Namespace) -> dict:
    """Before/after scores, the copy baseline, the VAE ceiling and the true edit's classifier agreement."""
    from inference.generate import TransfusionGenerator
    from inference.images import save_grid

    from .classifier import DigitClassifier, features, load_pixels

    train_rows = [json.loads(line) for line in (data / "raw" / "train" / "manifest.jsonl").read_text().splitlines()]
    train_rows = train_rows[::2][:2000]
    real = load_pixels([data / "raw" / "train" / r["path"] for r in train_rows], RESOLUTION)
    clf = DigitClassifier().fit(features(real), np.array([r["label"] for r in train_rows]))
    source = load_pixels([Path(e["source"]) for e in entries], RESOLUTION)
    truth = load_pixels([Path(e["target"]) for e in entries], RESOLUTION)
    ref = TransfusionGenerator.from_folder(base_folder)
    with torch.no_grad():
        recon = ref.decode_images(torch.stack([ref.encode_image(e["target"]) for e in entries]))
    results: dict[str, Any] = {"edits": {}}
    before, before_images = score(base_folder, entries, truth, clf, settings)
    after, after_images = score(tuned_folder, entries, truth, clf, settings)
    copy, ceiling, true_edit = (summarize(x, entries, truth, clf) for x in (source, recon, truth))
    for name, (instruction, _, _) in EDITS.items():
        results["edits"][name] = {
            "instruction": instruction, "n": after[name]["n"],
            "psnr_before": before[name]["psnr"], "psnr_after": after[name]["psnr"],
            "psnr_copy_input": copy[name]["psnr"], "psnr_vae_ceiling": ceiling[name]["psnr"],
            "agreement_before": before[name]["classifier_agreement"],
            "agreement_after": after[name]["classifier_agreement"],
            "agreement_true_edit": true_edit[name]["classifier_agreement"],
            "beats_copy": after[name]["psnr"] > copy[name]["psnr"]}
    results["all_beat_copy"] = all(e["beats_copy"] for e in results["edits"].values())
    show = []
    for name in EDITS:  # per edit, 8 digits: source, true edit, before, after
        idx = [k for k, e in enumerate(entries) if e["edit"] == name][:8]
        show += [source[idx], truth[idx], before_images[idx], after_images[idx]]
    results["samples"] = str(save_grid(torch.cat(show), out / "samples.png", nrow=8))
    return results


def report(r: dict) -> str:
    """results.json as a markdown table."""
    lines = ["| edit | PSNR before | PSNR after | copy input | VAE ceiling | agreement before | after | true edit |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in r["edits"].items():
        lines.append(f"| {name} (\"{e['instruction']}\") | {e['psnr_before']:.2f} dB | **{e['psnr_after']:.2f} dB** | "
                     f"{e['psnr_copy_input']:.2f} dB | {e['psnr_vae_ceiling']:.2f} dB | {e['agreement_before']:.0%} | "
                     f"{e['agreement_after']:.0%} | {e['agreement_true_edit']:.0%} |")
    lines.append("")
    lines.append(f"Held-out digits per edit: {next(iter(r['edits'].values()))['n']}; every edit beats copying the "
                 f"input: {r['all_beat_copy']}. Settings: {r['settings']}.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m examples.digits.edit", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="examples.digits.prepare's output")
    ap.add_argument("--base", default="outputs/tiny/checkpoints/step_00006000", help="the demo's checkpoint")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "edit_tiny.yaml"))
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: the config's)")
    ap.add_argument("--train-per-edit", type=int, default=1125, help="training digits per edit (each digit one edit)")
    ap.add_argument("--heldout-per-edit", type=int, default=50, help="held-out digits per edit (scored)")
    ap.add_argument("--cfg-scale", type=float, default=2.0, help="guidance on the instruction")
    ap.add_argument("--image-cfg-scale", type=float, default=1.5, help="guidance on the source image")
    ap.add_argument("--diffusion-steps", dest="steps_ddim", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50, help="prompts per generation batch")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    from data_prep.cli import setup_logging
    from inference.convert import convert_checkpoint

    args = build_parser().parse_args(argv)
    setup_logging()
    data, out, base = Path(args.data), Path(args.out), Path(args.base)
    for need, what in ((data / "raw" / "train" / "manifest.jsonl", "--data"), (base / "train_state.pt", "--base")):
        if not need.is_file():
            raise SystemExit(f"{what}: {need} not found; run `make demo` first (or point {what} at its output)")
    t0, seconds = time.time(), {}
    train_manifest, _ = write_triples(data, out, "train", args.train_per_edit)
    _, heldout = write_triples(data, out, "heldout", None)
    heldout = [e for name in EDITS for e in [x for x in heldout if x["edit"] == name][: args.heldout_per_edit]]
    shards = out / "shards" / "edit"
    encoded = encode(train_manifest, shards, data)
    seconds["triples_and_encode"] = time.time() - t0
    tuned = fine_tune(Path(args.config), base, data, out, args.steps)
    seconds["fine_tune"] = time.time() - t0 - sum(seconds.values())
    tokenizer, vae = data / "tokenizer" / "tokenizer.model", data / "vae"
    folders = {}
    for name, ckpt in (("before", base), ("after", tuned)):
        convert_checkpoint(ckpt, out / "models" / name, tokenizer=tokenizer, vae=vae, overwrite=True)
        folders[name] = out / "models" / name
    settings = argparse.Namespace(steps=args.steps_ddim, cfg_scale=args.cfg_scale, image_cfg_scale=args.image_cfg_scale,
                                  batch=args.batch, seed=args.seed)
    results = evaluate(folders["before"], folders["after"], data, heldout, out, settings)
    seconds["evaluate"] = time.time() - t0 - sum(seconds.values())
    results |= {"base": str(base), "fine_tuned": str(tuned), "train_triples": encoded["written"],
                "settings": {"cfg_scale": args.cfg_scale, "image_cfg_scale": args.image_cfg_scale,
                             "diffusion_steps": args.steps_ddim, "sampler": "ddim"},
                "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report(results))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
