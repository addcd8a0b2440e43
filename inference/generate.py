"""Mixed-modal generation from an inference folder: `python -m inference.generate FOLDER --prompt ...`.

LM mode samples tokens until EOS, the token budget, or BOI; at BOI the image's patches start as
Gaussian noise and are denoised (DDPM or DDIM, diffusers) with the model attending causally to the
prefix and bidirectionally inside the image, with classifier-free guidance (cond and uncond rows in
one batch; uncond = BOS, BOI, patches; with `image_cfg_scale`, for editing, a third row holds the
prompt's images without its text, and the text and the images get a scale each); then EOI is
appended and LM mode resumes. The prefix's
keys/values are cached and reused by every diffusion step and LM step. Row r draws all its noise
from a generator seeded with seed + r, so a row's output does not depend on the rest of the batch.

With `model.image_representation: tokens` (the discrete baseline) an image is sampled token by
token instead: after BOI, N = latent_size^2 ids restricted to the image-code range, with
classifier-free guidance on the logits (same cond/uncond rows), decoded by the folder's VQModel.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import torch

from config import DiffusionConfig
from model.transfusion import TransfusionModel

from .engine import Group, RowState
from model.vq import decode_codes, encode_codes
from model.vq import downsample as vq_downsample

from .images import (
    VAEError, decode_latents, encode_image_file, preprocess_image_file, save_grid, save_pngs, vae_resolution,
)
from .loading import InferenceFolderError, load_inference_model
from .prompts import ImagePart, Prompt, PromptError, encode_prompt
from .sampling import SamplerKind, guided_logits, guided_noise, make_sampler, sample_tokens
from .tokenizer import TextTokenizer, TokenizerError

Mode = Literal["text", "image", "caption", "interleaved"]
TEXT, IMAGE, DONE = "text", "image", "done"


@dataclass
class GenerationConfig:
    """How to sample. Modes: text (no images), image (BOI forced after the prompt, stop after the
    image), caption (the prompt holds an image; text out), interleaved (the model decides)."""

    mode: Mode = "text"
    max_new_tokens: int = 64  # sampled tokens per row (BOI counts; EOI and patches do not)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    max_images: int | None = None  # generated images per row in interleaved mode (None = no limit)
    cfg_scale: float = 5.0  # classifier-free guidance; 1 = conditional only (no uncond rows)
    # editing: guidance on the prompt's images (cfg_scale then guides its text), InstructPix2Pix style;
    # None: one scale over the whole prompt
    image_cfg_scale: float | None = None
    steps: int = 250
    sampler: SamplerKind = "ddpm"
    eta: float = 0.0  # DDIM only
    timestep_spacing: str = "leading"  # diffusers default; "trailing" starts at T-1 (abar ~ 2e-9 for cosine: ill-conditioned)
    seed: int = 0
    use_cache: bool = True

    def validate(self) -> None:
        if self.mode not in ("text", "image", "caption", "interleaved"):
            raise ValueError(f"unknown mode {self.mode!r}; use text, image, caption or interleaved")
        if self.temperature < 0 or self.max_new_tokens < 0 or self.steps < 1:
            raise ValueError("temperature and max_new_tokens must be >= 0 and steps >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {self.sampler!r}; use ddpm or ddim")
        if self.image_cfg_scale is not None and self.mode not in ("image", "interleaved"):
            raise ValueError(f"image_cfg_scale guides generated images; mode {self.mode!r} generates none")

    def image_budget(self) -> float:
        return {"text": 0, "caption": 0, "image": 1}.get(self.mode, self.max_images if self.max_images is not None else float("inf"))


@dataclass
class GenerationResult:
    """One row's output: sampled ids (a generated image shows as BOI, EOI) and the image latents."""

    tokens: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # [C, h, w] fp32 scaled latents, or [h, w] int64 VQ codes
    finish_reason: str = ""  # eos | length | context | image
    text: str | None = None  # decoded when there is a tokenizer; images as <|image|>


@dataclass
class _Run:
    """Per-row generation state: the sequence, the token waiting to be fed, the row's generator."""

    row: RowState
    gen: torch.Generator
    result: GenerationResult
    next: int = -1
    status: str = TEXT
    sampled: int = 0  # tokens sampled so far (counts against max_new_tokens)
    images_made: int = 0
    prompt_images: list[torch.Tensor] = field(default_factory=list)  # the prompt's latents, for image guidance


class TransfusionGenerator:
    """Python API: `TransfusionGenerator.from_folder(path).generate(prompts, GenerationConfig(...))`."""

    def __init__(
        self, model: TransfusionModel, diffusion: DiffusionConfig, tokenizer: TextTokenizer | None = None,
        vae: object | None = None,
    ) -> None:
        self.model, self.diffusion, self.tokenizer, self.vae = model.eval(), diffusion, tokenizer, vae
        self.cfg = model.cfg
        self.device = next(model.parameters()).device

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", dtype: str | None = None) -> "TransfusionGenerator":
        model, cfg, tokenizer, vae = load_inference_model(folder, device, dtype)
        return cls(model, cfg.diffusion, tokenizer, vae)

    @property
    def tokens_mode(self) -> bool:
        """Images are VQ codes read and written as tokens (model.image_representation: tokens)."""
        return self.cfg.image_representation == "tokens"

    def encode_image(self, path: str) -> torch.Tensor:
        """An image file -> latent [C, h, w] with this folder's VAE, or codes [h, w] with its VQ model."""
        if self.vae is None:
            what = "VQ model" if self.tokens_mode else "VAE"
            raise PromptError(f"image '{path}' needs a {what} and the model folder has none; pass a "
                              f"{'code grid' if self.tokens_mode else 'latent'} instead")
        if self.tokens_mode:
            x = preprocess_image_file(path, self.image_resolution())[None]
            with torch.no_grad():
                return encode_codes(self.vae, x)[0].cpu()
        return encode_image_file(self.vae, path, self.cfg)

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] (or VQ codes [N, h, w]) -> images [N, 3, H, W] in [0, 1]."""
        if self.vae is None:
            raise VAEError("decoding images needs a VQ model; convert with --vq" if self.tokens_mode
                           else "decoding images needs a VAE; convert with --vae")
        if self.tokens_mode:
            with torch.no_grad():
                return ((decode_codes(self.vae, latents).float() + 1) / 2).clamp(0, 1).cpu()
        return decode_latents(self.vae, latents)

    def image_resolution(self) -> int:
        """Pixel side of the model's images (from the VAE or VQ model's downsampling)."""
        if self.vae is None:
            raise VAEError("the image size needs the folder's VAE / VQ model")
        if self.tokens_mode:
            return self.cfg.latent_size * vq_downsample(self.vae)
        return vae_resolution(self.vae, self.cfg)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt] | str, config: GenerationConfig | None = None,
                 seeds: Sequence[int] | None = None, **overrides) -> list[GenerationResult]:
        """Generate for a batch of prompts (a string or a list of ids is one prompt); keyword
        arguments override fields of `config`. Row i draws from seed `seeds[i]` (default config.seed + i),
        so a sample can keep its seed whatever batch it runs in."""
        cfg = replace(config or GenerationConfig(), **overrides)
        cfg.validate()
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and all(isinstance(p, int) for p in prompts))
        prompts = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if self.tokens_mode and cfg.image_cfg_scale is not None:
            raise ValueError("image_cfg_scale guides diffusion over latent images; this model writes images as "
                             "VQ tokens (model.image_representation: tokens): use cfg_scale alone")
        runs = [self._start(p, i, cfg, cfg.seed + i if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        self._prefill(runs, cfg)
        while True:
            if any(r.status == TEXT for r in runs):
                self._decode_text([r for r in runs if r.status == TEXT], cfg)
            elif any(r.status == IMAGE for r in runs):
                image_runs = [r for r in runs if r.status == IMAGE]
                if self.tokens_mode:
                    self._generate_image_tokens(image_runs, cfg)
                else:
                    self._generate_images(image_runs, cfg)
            else:
                break
        for r in runs:
            if self.tokenizer is not None:
                r.result.text = self._render(r.result.tokens)
        return [r.result for r in runs]

    def _start(self, prompt: Prompt, index: int, cfg: GenerationConfig, seed: int) -> _Run:
        t, P, max_len = self.cfg.tokens, self.cfg.patches_per_image, self.cfg.max_seq_len
        loader = self.encode_image if self.vae is not None else None
        segments = encode_prompt(prompt, self.cfg, self.tokenizer, loader)
        if cfg.mode == "image" and not (isinstance(segments[-1], list) and segments[-1][-1] == t.boi):
            segments.append([t.boi])
        if cfg.mode == "caption" and not any(isinstance(s, torch.Tensor) for s in segments):
            raise PromptError(f"caption mode needs an image in every prompt; prompt {index} has none (pass an ImagePart, a latent or <|image:PATH|>)")
        row = RowState.from_segments(segments, self.cfg)
        wants_image = row.tokens[-1] == t.boi
        need = len(row) + (P + 1 if wants_image else 1)
        if need > max_len:
            extra = f" plus {P} patches and EOI for the image" if wants_image else " plus one new token"
            raise PromptError(
                f"prompt {index} takes {len(row)} positions{extra} = {need}, more than the model's context "
                f"of {max_len} (model.max_seq_len); shorten the prompt"
            )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        run = _Run(row, gen, GenerationResult(), prompt_images=[s for s in segments if isinstance(s, torch.Tensor)])
        run.next = row.tokens.pop()  # the last prompt token is fed by the first decode step
        row.is_image.pop()
        return run

    def _prefill(self, runs: list[_Run], cfg: GenerationConfig) -> None:
        """Feed every prompt but its last token in one batch (left-padded), then set each row's mode."""
        if any(len(r.row) for r in runs):
            group = Group(self.model, [r.row for r in runs], cfg.use_cache)
            group.forward(append=True)
            group.release()
        for r in runs:
            if r.next == self.cfg.tokens.boi:
                r.status = IMAGE
            else:
                self._after_token(r, cfg)

    def _after_token(self, r: _Run, cfg: GenerationConfig) -> None:
        """Set the row's status once `r.next` is known (the token will sit at position len(row))."""
        t = self.cfg.tokens
        if r.next == t.eos:
            r.status, r.result.finish_reason = DONE, "eos"
        elif r.next == t.boi:
            r.status = IMAGE
        elif r.sampled >= cfg.max_new_tokens:
            r.status, r.result.finish_reason = DONE, "length"
        elif len(r.row) + 2 > self.cfg.max_seq_len:
            r.status, r.result.finish_reason = DONE, "context"
        else:
            r.status = TEXT

    def _banned(self, r: _Run, cfg: GenerationConfig) -> list[int]:
        t = self.cfg.tokens
        banned = [t.pad, t.eoi]
        room = len(r.row) + self.cfg.patches_per_image + 2 <= self.cfg.max_seq_len
        if r.images_made >= cfg.image_budget() or not room:
            banned.append(t.boi)
        if self.tokens_mode:  # image codes only inside BOI ... EOI
            banned.extend(range(*self.cfg.image_token_range))
        return banned

    def _decode_text(self, runs: list[_Run], cfg: GenerationConfig) -> None:
        """LM mode for rows in TEXT until each has left it; the group shrinks as rows leave."""
        while runs:
            group = Group(self.model, [r.row for r in runs], cfg.use_cache)
            while all(r.status == TEXT for r in runs):
                for r in runs:
                    r.row.add_tokens([r.next])
                logits, _ = group.forward(append=True)  # [R, V]
                for i, r in enumerate(runs):
                    logits[i, self._banned(r, cfg)] = float("-inf")
                if self.tokenizer is not None:  # ids past the tokenizer (a padded vocab) have no text
                    logits[:, self.tokenizer.vocab_size:] = float("-inf")
                for r, tok in zip(runs, sample_tokens(logits, [r.gen for r in runs], cfg.temperature, cfg.top_k, cfg.top_p)):
                    r.next, r.sampled = tok, r.sampled + 1
                    r.result.tokens.append(tok)
                    self._after_token(r, cfg)
            group.release()
            runs = [r for r in runs if r.status == TEXT]

    def _generate_images(self, runs: list[_Run], cfg: GenerationConfig) -> None:
        """Diffusion mode for rows whose next token is BOI: one image each, batched with CFG."""
        t, P = self.cfg.tokens, self.cfg.patches_per_image
        C, s = self.cfg.latent_channels, self.cfg.latent_size
        rows = [r.row for r in runs]
        for r in runs:
            r.row.add_tokens([t.boi])
            if r.result.tokens[-1:] != [t.boi]:  # BOI came from the prompt: record it like a sampled one
                r.result.tokens.append(t.boi)
        self._feed(rows, cfg)
        uncond: list[RowState] = []
        if self._needs_uncond(cfg):  # the caption-dropout document: BOS, BOI, patches
            uncond = [RowState() for _ in runs]
            for u in uncond:
                u.add_tokens([t.bos, t.boi])
            if cfg.image_cfg_scale is not None:  # and the instruction-dropout one: BOS, the prompt's images, BOI
                uncond += [RowState.from_segments([[t.bos], *r.prompt_images, [t.boi]], self.cfg) for r in runs]
            self._feed(uncond, cfg)
        sched = make_sampler(self.diffusion, cfg.sampler, cfg.steps, cfg.timestep_spacing)
        x = torch.stack([torch.randn((C, s, s), generator=r.gen, device=self.device) for r in runs])  # [R, C, h, w]
        slots = [row.add_image(x[i % len(runs)], P, t.pad) for i, row in enumerate(rows + uncond)]
        group = Group(self.model, rows + uncond, cfg.use_cache)
        extra = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
        R = len(runs)
        for step in sched.timesteps:
            for i, slot in enumerate(slots):
                slot.latent, slot.t = x[i % R], int(step)
            _, eps = group.forward(append=False)  # [R (+R uncond) (+R image-only), C, h, w]
            eps = guided_noise(eps[:R], eps[R:2 * R] if uncond else None, cfg.cfg_scale,
                               eps[2 * R:] if len(uncond) > R else None,
                               1.0 if cfg.image_cfg_scale is None else cfg.image_cfg_scale)
            x = sched.step(eps, step, x, generator=[r.gen for r in runs], **extra).prev_sample
        group.release()
        for i, r in enumerate(runs):
            slots[i].latent, slots[i].t = x[i], 0
            r.result.tokens.append(t.eoi)
            r.result.images.append(x[i].float().cpu())
            r.images_made += 1
            r.next = t.eoi
        self._feed(rows, cfg)  # the clean patches, so the text after the image reads it
        for r in runs:
            if cfg.mode == "image":
                r.status, r.result.finish_reason = DONE, "image"
            else:
                self._after_token(r, cfg)

    def _generate_image_tokens(self, runs: list[_Run], cfg: GenerationConfig) -> None:
        """Token mode for rows whose next token is BOI: N codes each, sampled from the code range with
        CFG on the logits (uncond rows: BOS, BOI, the same codes), batched; then EOI."""
        t, N = self.cfg.tokens, self.cfg.patches_per_image
        lo, hi = self.cfg.image_token_range
        rows = [r.row for r in runs]
        for r in runs:
            r.row.add_tokens([t.boi])
            if r.result.tokens[-1:] != [t.boi]:  # BOI came from the prompt: record it like a sampled one
                r.result.tokens.append(t.boi)
        uncond: list[RowState] = []
        if self._needs_uncond(cfg):  # the caption-dropout document: BOS, BOI, codes
            uncond = [RowState() for _ in runs]
            for u in uncond:
                u.add_tokens([t.bos])
            self._feed(uncond, cfg)
            for u in uncond:  # now in step with the cond rows: one unfed position (BOI) each
                u.add_tokens([t.boi])
        group = Group(self.model, rows + uncond, cfg.use_cache)
        codes: list[list[int]] = [[] for _ in runs]
        for k in range(N):
            logits, _ = group.forward(append=True)  # [R (+R uncond), V]
            logits = guided_logits(logits[:len(runs)], logits[len(runs):] if uncond else None, cfg.cfg_scale)
            logits[:, :lo] = float("-inf")
            logits[:, hi:] = float("-inf")
            for i, tok in enumerate(sample_tokens(logits, [r.gen for r in runs], cfg.temperature, cfg.top_k, cfg.top_p)):
                codes[i].append(tok - lo)
                rows[i].add_tokens([tok])
                if uncond:
                    uncond[i].add_tokens([tok])
        group.release()
        s = self.cfg.latent_size
        for i, r in enumerate(runs):
            r.result.tokens.append(t.eoi)
            r.result.images.append(torch.tensor(codes[i], dtype=torch.int64).reshape(s, s))
            r.images_made += 1
            r.next = t.eoi
        if cfg.mode == "image":
            for r in runs:
                r.status, r.result.finish_reason = DONE, "image"
            return
        self._feed(rows, cfg)  # the last code, so the text after the image reads all of it
        for r in runs:
            self._after_token(r, cfg)

    def _needs_uncond(self, cfg: GenerationConfig) -> bool:
        """At scale 1 guidance is the conditional prediction, so the uncond rows are skipped."""
        return cfg.cfg_scale != 1.0 or cfg.image_cfg_scale not in (None, 1.0)

    def _feed(self, rows: list[RowState], cfg: GenerationConfig) -> None:
        group = Group(self.model, rows, cfg.use_cache)
        group.forward(append=True)
        group.release()

    def _render(self, tokens: list[int]) -> str:
        """Generated ids -> text with <|image|> where an image was generated."""
        assert self.tokenizer is not None
        t, out, chunk = self.cfg.tokens, [], []
        for tok in tokens:
            if tok in (t.boi, t.eos):
                out.append(self.tokenizer.decode(chunk))
                out.append("<|image|>" if tok == t.boi else "")
                chunk = []
            elif tok != t.eoi:
                chunk.append(tok)
        out.append(self.tokenizer.decode(chunk))
        return "".join(out)


def save_results(generator: TransfusionGenerator, results: list[GenerationResult], out_dir: Path) -> dict:
    """Write every generated image (PNG with a VAE, else .pt latents), a grid PNG, and results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"rows": []}
    all_images = []
    for i, res in enumerate(results):
        files = []
        if res.images:
            names = [out_dir / f"sample_{i:03d}_{j}" for j in range(len(res.images))]
            if generator.vae is not None:
                pixels = generator.decode_images(torch.stack(res.images))
                all_images.append(pixels)
                files = save_pngs(pixels, [n.with_suffix(".png") for n in names])
            else:
                files = [n.with_suffix(".pt") for n in names]
                for lat, f in zip(res.images, files):
                    torch.save(lat, f)
        summary["rows"].append({
            "text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason,
            "images": [str(f) for f in files],
        })
    if all_images:
        summary["grid"] = str(save_grid(torch.cat(all_images), out_dir / "grid.png"))
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="inference folder written by `python -m inference.convert`")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch); "
                    "specials <|bos|> <|eos|> <|boi|>, images <|image:PATH|> (picture or .pt latent)")
    ap.add_argument("--prompt-ids", action="append", default=[], help="a prompt as comma-separated token ids")
    ap.add_argument("--image", action="append", default=[], help="caption mode: an image file or .pt latent per prompt")
    ap.add_argument("--mode", choices=["text", "image", "caption", "interleaved"], default=None,
                    help="default: caption with --image, else text")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--max-images", type=int, default=None, help="interleaved mode: images per row")
    ap.add_argument("--cfg-scale", type=float, default=5.0, help="guidance scale (with --image-cfg-scale: of the text)")
    ap.add_argument("--image-cfg-scale", type=float, default=None,
                    help="editing: guidance on the prompt's images, e.g. 1.5 (a third row: the images without the text)")
    ap.add_argument("--steps", type=int, default=250, help="diffusion steps")
    ap.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for small models on busy CPUs)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the folder's dtype")
    ap.add_argument("--out", default="outputs/generate", help="folder for images, grid.png and results.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts: list[Prompt] = list(args.prompt)
    prompts += [[int(x) for x in s.split(",") if x.strip()] for s in args.prompt_ids]
    prompts += [[ImagePart(path=p)] for p in args.image]
    mode = args.mode or ("caption" if args.image else "text")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not prompts:
        prompts = [""] if mode in ("image", "text", "interleaved") else prompts
    try:
        gen = TransfusionGenerator.from_folder(args.folder, args.device, args.dtype)
        cfg = GenerationConfig(
            mode=mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, max_images=args.max_images, cfg_scale=args.cfg_scale,
            image_cfg_scale=args.image_cfg_scale, steps=args.steps,
            sampler=args.sampler, eta=args.eta, seed=args.seed, use_cache=not args.no_cache,
        )
        results = gen.generate(prompts, cfg)
        summary = save_results(gen, results, Path(args.out))
    except (InferenceFolderError, PromptError, TokenizerError, VAEError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(summary["rows"]):
        shown = row["text"] if row["text"] is not None else row["tokens"]
        print(f"[{i}] ({row['finish_reason']}) {shown}" + (f"  images: {', '.join(row['images'])}" if row["images"] else ""))
    if "grid" in summary:
        print(f"grid: {summary['grid']}")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
