"""Sample from a model and score it the paper's way: FID / FD, CLIP score, CIDEr / BLEU, accuracy, perplexity.

    python -m inference.evaluate MODEL (--manifest eval.jsonl | --shards HELDOUT_DIR ...) [--suite auto | fid,fd,accuracy,clip,captions,ppl]
        [--inception pt_inception-2015-12-05-6726825d.pth] [--feature-net NET.pt2 [--feature-name NAME]]
        [--clip CLIP_DIR] [--samples N] [--steps 50 --sampler ddim --cfg-scale 5] [--out DIR]
    torchrun --nproc-per-node 8 -m inference.evaluate MODEL ...     # each rank samples its share

MODEL is an inference folder (`inference.convert`), or a checkpoint / run folder that is converted
into OUT/model first (with --tokenizer, --vae, --ema as for inference.convert). A manifest or
held-out shard sets (inference/eval_set.py) give caption prompts, reference images and texts. `--suite auto` runs
every metric whose inputs are given. Sample i is drawn from seed `--seed + i` in any batch and on
any rank, so a sharded run scores the same samples as one process; feature sums, counts and
captions are reduced over ranks and rank 0 writes OUT/results.json, OUT/results.md,
OUT/samples/NNNNNN.png, OUT/grid.png and OUT/captions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .eval_set import EvalSet, ManifestError, Reference, read_manifest, read_shards, shard
from .image_scores import ClipScore, FeatureNet, Frechet, ScoreError, check_inception, file_identity
from .text_scores import caption_scores, perplexity, text_nll

METRICS = ("fid", "fd", "accuracy", "clip", "captions", "ppl")
GRID_SAMPLES = 64


class EvaluateError(ValueError):
    """Arguments that do not fit together (a metric without its inputs); one line for the user."""


@dataclass
class Settings:
    """How samples are drawn (the CLI flags)."""

    samples: int | None = None  # caption -> image samples (prompts cycled); default one per prompt
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 5.0
    seed: int = 0
    batch_size: int = 16
    max_caption_tokens: int = 32


def choose_suite(asked: str, data: EvalSet, inception: str | None, feature_net: FeatureNet | None,
                 clip: str | None) -> list[str]:
    """The metrics to run: `auto` = every one whose inputs are present; a named one without its inputs is an error."""
    have = {
        "fid": (inception is not None and bool(data.prompts) and bool(data.images), "--inception FILE, caption prompts and reference images"),
        "fd": (feature_net is not None and bool(data.prompts) and bool(data.images), "--feature-net FILE, caption prompts and reference images"),
        "accuracy": (feature_net is not None and feature_net.classifies and data.labelled,
                     "a --feature-net that returns class ids and a 'label' on every caption prompt"),
        "clip": (clip is not None and bool(data.prompts), "--clip DIR and caption prompts"),
        "captions": (bool(data.referenced), "reference images with 'references' (or 'caption')"),
        "ppl": (bool(data.texts), "'text' rows in the manifest or a text --shards set"),
    }
    if asked == "auto":
        suite = [m for m in METRICS if have[m][0]]
        if not suite:
            raise EvaluateError("nothing to evaluate: the manifest and flags give no metric its inputs (see --help)")
        return suite
    suite = [m.strip() for m in asked.split(",") if m.strip()]
    for m in suite:
        if m not in have:
            raise EvaluateError(f"unknown metric '{m}' in --suite; choose from {', '.join(METRICS)} or auto")
        if not have[m][0]:
            raise EvaluateError(f"--suite {m} needs {have[m][1]}")
    return suite


class Run:
    """One evaluation on this rank: its share of the samples, captions and texts, then the reduced scores."""

    def __init__(self, gen: Any, data: EvalSet, suite: list[str], s: Settings, out: Path, rank: int, world: int,
                 feature_net: FeatureNet | None, feature_name: str, inception: str | None, clip: str | None,
                 stats_cache: Path) -> None:
        self.gen, self.data, self.suite, self.s, self.out = gen, data, suite, s, out
        self.rank, self.world, self.stats_cache = rank, world, stats_cache
        self.res = gen.image_resolution() if {"fid", "fd", "accuracy", "clip"} & set(suite) else 0
        self.feature_net = feature_net
        self.frechets: dict[str, Frechet] = {}
        if "fid" in suite:
            self.frechets["fid"] = Frechet("fid", inception=inception, resolution=self.res)
        if "fd" in suite:
            self.frechets[f"fd_{feature_name}"] = Frechet(f"fd_{feature_name}", feature_net, resolution=self.res)
        self.clip = ClipScore(clip) if "clip" in suite else None
        self.counts: dict[str, int] = {}
        self.captions: list[tuple[int, str]] = []  # rank 0: every (reference index, generated caption)
        self.seconds: dict[str, float] = {}

    def n_samples(self) -> int:
        return self.s.samples if self.s.samples is not None else len(self.data.prompts)

    def sample_images(self) -> None:
        """Caption -> image for this rank's samples; each one saved, scored as generated."""
        from .generate import GenerationConfig
        from .images import save_pngs

        t0, s, prompts = time.time(), self.s, self.data.prompts
        mine = shard(range(self.n_samples()), self.rank, self.world)
        cfg = GenerationConfig(mode="image", cfg_scale=s.cfg_scale, steps=s.steps, sampler=s.sampler)
        correct = done = 0
        for b in range(0, len(mine), s.batch_size):
            idx = [i for _, i in mine[b:b + s.batch_size]]
            rows = [prompts[i % len(prompts)] for i in idx]
            results = self.gen.generate([p.caption for p in rows], cfg, seeds=[s.seed + i for i in idx])
            images = self.gen.decode_images(torch.stack([r.images[0] for r in results]))  # [B, 3, H, W] in [0, 1]
            save_pngs(images, [self.out / "samples" / f"{i:06d}.png" for i in idx])
            for f in self.frechets.values():
                f.add(images, real=False)
            if self.clip is not None:
                self.clip.add(images, [p.caption for p in rows])
            if "accuracy" in self.suite:
                assert self.feature_net is not None
                pred = self.feature_net.classify(images)
                correct += int((pred == torch.tensor([p.label for p in rows])).sum())
            done += len(idx)
        self.counts |= {"samples": done, "correct": correct}
        self.seconds["sample_images"] = time.time() - t0

    def reference_statistics(self) -> None:
        """Reference features of each Fréchet score: from the cache, or this rank's share then cached."""
        t0, refs = time.time(), self.data.images
        identities = [file_identity(r.image) if r.image is not None else r.source for r in refs]
        for f in self.frechets.values():
            file = f.cache_file(self.stats_cache, identities)
            if f.load_reference(file, self.rank):
                continue
            mine = shard(refs, self.rank, self.world)
            for b in range(0, len(mine), 64):
                f.add(self._pixels([r for _, r in mine[b:b + 64]]), real=True)
            f.save_reference(file, self.rank)
        self.seconds["reference_statistics"] = time.time() - t0

    def _pixels(self, refs: list[Reference]) -> torch.Tensor:
        """Reference images [N, 3, H, W] in [0, 1]: files preprocessed like training images, shard
        latents decoded by the VAE."""
        from .images import preprocess_image_file

        if all(r.latent is not None for r in refs):
            return self.gen.decode_images(torch.stack([r.latent for r in refs]))
        return torch.cat([self.gen.decode_images(r.latent[None]) if r.latent is not None
                          else (preprocess_image_file(r.image, self.res)[None] + 1) / 2 for r in refs])

    def caption_images(self) -> list[tuple[int, str]]:
        """Image -> caption (greedy) for this rank's reference images."""
        from .generate import GenerationConfig
        from .prompts import ImagePart

        t0, s = time.time(), self.s
        mine = shard(self.data.referenced, self.rank, self.world)
        cfg = GenerationConfig(mode="caption", temperature=0.0, max_new_tokens=s.max_caption_tokens)
        out: list[tuple[int, str]] = []
        for b in range(0, len(mine), s.batch_size):
            chunk = mine[b:b + s.batch_size]
            parts = [ImagePart(latent=r.latent) if r.latent is not None else ImagePart(path=str(r.image)) for _, r in chunk]
            results = self.gen.generate([[p] for p in parts], cfg)
            out += [(i, (r.text or "").strip()) for (i, _), r in zip(chunk, results)]
        self.seconds["caption_images"] = time.time() - t0
        return out

    def text_likelihood(self) -> tuple[float, int]:
        t0 = time.time()
        if self.gen.tokenizer is None and any(isinstance(t, str) for t in self.data.texts):
            raise EvaluateError("perplexity needs the folder's tokenizer (convert with --tokenizer)")
        docs = [self.gen.tokenizer.encode(t) if isinstance(t, str) else t for _, t in shard(self.data.texts, self.rank, self.world)]
        nll = text_nll(self.gen.model, docs, self.s.batch_size)
        self.seconds["perplexity"] = time.time() - t0
        return nll

    def scores(self) -> dict[str, Any]:
        """Every metric of the suite over all ranks (collective: every rank calls it)."""
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        if {"fid", "fd", "accuracy", "clip"} & set(self.suite):
            self.sample_images()
            totals = _sum_over_ranks([self.counts["samples"], self.counts["correct"]])
            counts["samples"] = totals[0]
        if self.frechets:
            self.reference_statistics()
            for name, f in self.frechets.items():
                metrics[name] = f.compute()
            counts["reference_images"] = _sum_over_ranks([f.real_count() for f in self.frechets.values()][:1])[0]
        if "accuracy" in self.suite:
            metrics["accuracy"] = totals[1] / totals[0]
        if self.clip is not None:
            metrics["clip_score"] = self.clip.compute()
        if "captions" in self.suite:
            captions = _gather(self.caption_images())
            counts["captions"] = len(captions)
            if self.rank == 0:
                refs = self.data.referenced
                metrics |= caption_scores(dict(captions), {i: refs[i].references for i, _ in captions})
                self.captions = captions
        if "ppl" in self.suite:
            nll, n = self.text_likelihood()
            nll, n = _sum_over_ranks([nll, n], torch.float64)
            metrics |= {"text_nll": nll / n, "text_ppl": perplexity(nll, int(n))}
            counts["text_tokens"] = int(n)
        self._check_counts(counts)
        return {"metrics": metrics, "counts": counts}

    def _check_counts(self, counts: dict[str, int]) -> None:
        want = {"samples": self.n_samples(), "captions": len(self.data.referenced), "reference_images": len(self.data.images)}
        for k, n in counts.items():
            if k in want and n != want[k]:
                raise RuntimeError(f"{k}: scored {n}, expected {want[k]} (a shard was lost or duplicated)")


def _sum_over_ranks(values: Sequence[float], dtype: torch.dtype = torch.int64) -> list:
    t = torch.tensor(list(values), dtype=dtype)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(items: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Every rank's (index, caption) pairs, sorted by index (on every rank)."""
    if dist.is_initialized():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        items = [x for p in parts for x in p]
    return sorted(items)


# ---- results -------------------------------------------------------------------------------------


NAMES = {"fid": "FID", "accuracy": "classifier accuracy", "clip_score": "CLIP score", "cider": "CIDEr",
         "bleu4": "BLEU-4", "text_ppl": "held-out perplexity", "text_nll": "held-out NLL / token"}


def metric_name(key: str) -> str:
    """The printed name of a results.json key ("fd_digits" -> "FD-digits")."""
    return f"FD-{key[3:]}" if key.startswith("fd_") else NAMES.get(key, key)


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table (results.md, and what the command prints)."""
    n = results["counts"]
    over = {"accuracy": "samples", "clip_score": "samples", "cider": "captions", "bleu4": "captions",
            "text_ppl": "text_tokens", "text_nll": "text_tokens"}
    lines = [f"Evaluation of `{results['model']}` on {', '.join(f'`{x}`' for x in results['data'])}", "",
             "| metric | value | over |", "|---|---:|---|"]
    for k, v in results["metrics"].items():
        if k in ("bleu1", "bleu2", "bleu3"):
            continue
        what = over.get(k, "samples")
        basis = (f"{n['samples']} samples vs {n['reference_images']} reference images" if k == "fid" or k.startswith("fd_")
                 else f"{n.get(what, 0)} {what.replace('_', ' ')}")
        lines.append(f"| {metric_name(k)} | {v:.4g} | {basis} |")
    return "\n".join(lines) + "\n"


def write_results(run: Run, results: dict[str, Any]) -> None:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from .images import save_grid

    out = run.out
    pngs = sorted((out / "samples").glob("*.png"))[:GRID_SAMPLES]
    if pngs:
        images = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")).float() / 255 for p in pngs])
        results["files"]["grid"] = str(save_grid(images, out / "grid.png"))
    if run.captions:
        with open(out / "captions.jsonl", "w") as f:
            for i, text in run.captions:
                r = run.data.referenced[i]
                image = str(r.image) if r.image is not None else r.source
                f.write(json.dumps({"image": image, "caption": text, "references": r.references}) + "\n")
        results["files"]["captions"] = str(out / "captions.jsonl")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))


# ---- the command ---------------------------------------------------------------------------------


def _model_folder(model: Path, out: Path, args: argparse.Namespace, rank: int) -> Path:
    """An inference folder as is; a checkpoint / run folder converted into OUT/model (rank 0) first."""
    from .convert import convert_checkpoint
    from .loading import CONFIG_NAME

    if (model / CONFIG_NAME).is_file():
        return model
    if rank == 0:
        convert_checkpoint(model, out / "model", tokenizer=args.tokenizer, vae=args.vae, overwrite=True, ema=args.ema)
    if dist.is_initialized():
        dist.barrier()
    return out / "model"


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """The whole command on this rank; rank 0 returns the results (the others None)."""
    from .generate import TransfusionGenerator

    t0 = time.time()
    rank, world = dist.get_rank() if dist.is_initialized() else 0, dist.get_world_size() if dist.is_initialized() else 1
    if not (args.manifest or args.shards):
        raise EvaluateError("give --manifest FILE or --shards DIR (held-out shard sets): nothing to evaluate on")
    data = read_manifest(args.manifest) if args.manifest else EvalSet()
    for folder in args.shards:
        data.extend(read_shards(folder, args.limit))
    if args.inception is not None:
        check_inception(args.inception)
    out = Path(args.out)
    folder = _model_folder(Path(args.model), out, args, rank)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
    gen = TransfusionGenerator.from_folder(folder, device, args.dtype)
    net = FeatureNet(args.feature_net, gen.image_resolution()) if args.feature_net else None
    suite = choose_suite(args.suite, data, args.inception, net, args.clip)
    s = Settings(args.samples, args.steps, args.sampler, args.cfg_scale, args.seed, args.batch_size, args.max_caption_tokens)
    name = args.feature_name or (Path(args.feature_net).stem if args.feature_net else "")
    run = Run(gen, data, suite, s, out, rank, world, net, name, args.inception, args.clip, Path(args.stats_cache))
    scored = run.scores()
    if rank != 0:
        return None
    results = {"model": str(folder), "data": [x for x in [args.manifest, *args.shards] if x], "suite": suite, "world_size": world,
               "settings": asdict(s), **scored, "seconds": {k: round(v, 1) for k, v in run.seconds.items()},
               "files": {"results": str(out / "results.json"), "table": str(out / "results.md")}}
    results["seconds"]["total"] = round(time.time() - t0, 1)
    write_results(run, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m inference.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="inference folder, or a checkpoint / run folder (converted into OUT/model)")
    ap.add_argument("--manifest", default=None, help="JSON lines: caption prompts, reference images, texts (inference/eval_set.py)")
    ap.add_argument("--shards", action="append", default=[], help="a held-out image-caption or text shard set (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="samples read from each --shards set (default all)")
    ap.add_argument("--suite", default="auto", help=f"comma-separated among {', '.join(METRICS)}; auto: all whose inputs are given")
    ap.add_argument("--inception", default=None, help="FID: local Inception-v3 weights (torch-fidelity's pt_inception-2015-12-05)")
    ap.add_argument("--feature-net", default=None, help="FD (and accuracy): a torch.export program, images -> features (, class ids)")
    ap.add_argument("--feature-name", default=None, help="the FD's name (default: the feature net's file stem)")
    ap.add_argument("--clip", default=None, help="CLIP score: a local folder for CLIPModel / CLIPProcessor.from_pretrained")
    ap.add_argument("--samples", type=int, default=None, help="caption -> image samples (prompts cycled; default one per prompt)")
    ap.add_argument("--steps", type=int, default=50, help="diffusion steps")
    ap.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--max-caption-tokens", type=int, default=32)
    ap.add_argument("--out", default="outputs/evaluate")
    ap.add_argument("--stats-cache", default=str(Path.home() / ".cache" / "transfusion" / "reference_stats"),
                    help="folder of cached reference statistics")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: this rank's GPU)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--tokenizer", default=None, help="converting a checkpoint: its tokenizer.model")
    ap.add_argument("--vae", default=None, help="converting a checkpoint: its VAE folder")
    ap.add_argument("--ema", action="store_true", help="converting a checkpoint: score its EMA weights")
    return ap


def _init_distributed(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def main(argv: Sequence[str] | None = None) -> int:
    from .images import ImageFileError, VAEError
    from .loading import InferenceFolderError
    from .prompts import PromptError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.samples is not None and args.samples < 1:
        print("error: --samples must be >= 1", file=sys.stderr)
        return 2
    _init_distributed(args.device)
    try:
        results = evaluate(args)
    except (EvaluateError, ManifestError, ScoreError, InferenceFolderError, ImageFileError, PromptError, TokenizerError,
            VAEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if results is not None:
        print(markdown(results), end="")
        print(f"results: {results['files']['results']}" + (f"   grid: {results['files']['grid']}" if "grid" in results["files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
