"""Prompts: text (with <|special|> tokens), token ids and images -> a list of segments.

A prompt is a string or a list of parts: strings, token ids (or lists of them), latents [C, h, w] or ImageParts
(a latent, or an image file encoded with the VAE). In strings, special tokens are written
`<|bos|>`, `<|eos|>`, `<|boi|>` (only at the very end: "generate an image here") and images
`<|image:PATH|>` (a picture, or a `.pt` latent). BOS is prepended unless the prompt starts with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from config import ModelConfig

from .tokenizer import TextTokenizer

SPECIAL = re.compile(r"<\|([^|]*)\|>")
WRITABLE_SPECIALS = ("bos", "eos", "boi")


class PromptError(ValueError):
    """A prompt the model cannot take; the message says what to change."""


@dataclass
class ImagePart:
    """An image in a prompt: a latent [C, h, w] scaled like the training latents, or a file path."""

    latent: torch.Tensor | None = None
    path: str | None = None


PromptPart = Union[str, int, Sequence[int], torch.Tensor, ImagePart]
Prompt = Union[str, Sequence[PromptPart]]
Segment = Union[list[int], torch.Tensor]  # token ids, or one clean latent [C, h, w]
ImageLoader = Callable[[str], torch.Tensor]


def _is_ids(part: object) -> bool:
    if isinstance(part, torch.Tensor):
        return part.dim() == 1 and not part.is_floating_point()
    return isinstance(part, (list, tuple)) and all(isinstance(i, int) for i in part)


def _split_text(text: str, cfg: ModelConfig, tokenizer: TextTokenizer | None) -> list[PromptPart]:
    """A string -> token-id lists and ImageParts, resolving <|...|> specials."""
    parts: list[PromptPart] = []
    pos = 0
    for m in SPECIAL.finditer(text):
        parts.extend(_encode_literal(text[pos:m.start()], tokenizer))
        name = m.group(1).strip()
        if name.startswith("image:"):
            parts.append(ImagePart(path=name[len("image:"):].strip()))
        elif name in WRITABLE_SPECIALS:
            parts.append([getattr(cfg.tokens, name)])
        else:
            hint = " (images are closed automatically)" if name == "eoi" else ""
            raise PromptError(
                f"unknown special token '{m.group(0)}' in the prompt{hint}; known: <|bos|>, <|eos|>, "
                f"<|boi|> (at the end only), <|image:PATH|>"
            )
        pos = m.end()
    parts.extend(_encode_literal(text[pos:], tokenizer))
    return parts


def _encode_literal(text: str, tokenizer: TextTokenizer | None) -> list[PromptPart]:
    if not text:
        return []
    if tokenizer is None:
        raise PromptError(
            "the prompt has text but this model folder has no tokenizer; pass token ids instead "
            "(or convert with --tokenizer)"
        )
    return [tokenizer.encode_prompt(text)]


def _load_latent(part: ImagePart, cfg: ModelConfig, load_image: ImageLoader | None) -> torch.Tensor:
    if part.latent is not None:
        latent = part.latent
    elif part.path is not None and Path(part.path).suffix in (".pt", ".pth"):
        if not Path(part.path).is_file():
            raise PromptError(f"latent file '{part.path}' in the prompt does not exist")
        latent = torch.load(part.path, map_location="cpu", weights_only=True)
    elif part.path is not None:
        if not Path(part.path).is_file():
            raise PromptError(f"image file '{part.path}' in the prompt does not exist")
        if load_image is None:
            raise PromptError(f"image '{part.path}' needs a VAE to encode it, and none is loaded; pass a latent")
        latent = load_image(part.path)
    else:
        raise PromptError("an ImagePart needs a latent or a path")
    if cfg.image_representation == "tokens":
        return _check_codes(latent, cfg)
    want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if tuple(latent.shape) != want:
        raise PromptError(f"a prompt image has latent shape {list(latent.shape)}; the model takes {list(want)}")
    return latent.detach().float().cpu()


def _check_codes(codes: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A prompt image of a tokens-representation model: its VQ code grid [s, s], integer codes in range."""
    s = cfg.latent_size
    if codes.is_floating_point() or tuple(codes.shape) != (s, s):
        raise PromptError(f"a prompt image must be a {s}x{s} grid of integer VQ codes for this model (it reads images "
                          f"as tokens); got a {codes.dtype} tensor of shape {list(codes.shape)}")
    codes = codes.detach().long().cpu()
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < cfg.image_codebook_size):
        raise PromptError(f"prompt image codes must lie in [0, {cfg.image_codebook_size}) (model.image_codebook_size)")
    return codes


def encode_prompt(
    prompt: Prompt, cfg: ModelConfig, tokenizer: TextTokenizer | None = None,
    load_image: ImageLoader | None = None, add_bos: bool = True,
) -> list[Segment]:
    """Resolve a prompt into segments (merged token-id lists and latents), checked for the model."""
    if isinstance(prompt, (str, ImagePart)) or _is_ids(prompt) or isinstance(prompt, torch.Tensor):
        prompt = [prompt]  # type: ignore[list-item]
    raw: list[PromptPart] = []
    for part in prompt:
        raw.extend(_split_text(part, cfg, tokenizer) if isinstance(part, str) else [part])
    segments: list[Segment] = []
    for part in raw:
        if isinstance(part, int) and not isinstance(part, bool):
            part = [part]
        if _is_ids(part):
            ids = [int(i) for i in part]  # type: ignore[union-attr]
            bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
            if bad:
                raise PromptError(f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
            if segments and isinstance(segments[-1], list):
                segments[-1].extend(ids)
            elif ids:
                segments.append(ids)
        elif isinstance(part, torch.Tensor):
            segments.append(_load_latent(ImagePart(latent=part), cfg, load_image))
        elif isinstance(part, ImagePart):
            segments.append(_load_latent(part, cfg, load_image))
        else:
            raise PromptError(f"cannot use a {type(part).__name__} as a prompt part")
    t = cfg.tokens
    if add_bos and not (segments and isinstance(segments[0], list) and segments[0][0] == t.bos):
        segments.insert(0, [t.bos])
        if len(segments) > 1 and isinstance(segments[1], list):
            segments[:2] = [segments[0] + segments[1]]
    for k, seg in enumerate(segments):
        if isinstance(seg, list):
            for name in ("eoi", "pad"):
                if getattr(t, name) in seg:
                    raise PromptError(f"the prompt holds the {name} id {getattr(t, name)}, which a prompt cannot contain")
            last = k == len(segments) - 1
            if t.boi in (seg if not last else seg[:-1]):
                raise PromptError("<|boi|> may only end a prompt (it asks for an image there); pass prompt images as image parts")
    return segments
