"""Tiny random assets shared by tests and benchmarks: a random-weight VAE, a small tokenizer, images.

Nothing here is used by the real pipeline; it exists so tests and benchmarks build the same small
things in one way (no network, seconds on 2 cores). It lives outside the library packages (which
never import `examples`) and outside `tests/` (so benchmarks do not depend on the test suite);
the test-only builders on top of it (`write_mixed_set`, `GOOD_KINDS`) are in tests/helpers.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

WORDS = ("a the small large red green blue handwritten digit number photo picture of cat dog tree "
         "house river sky written by hand zero one two three four five six seven eight nine").split()


def make_tiny_vae(path: str | Path, block_out_channels: Sequence[int] = (8, 16), latent_channels: int = 4,
                  resolution: int = 16, seed: int = 0, scaling_factor: float = 0.5) -> Path:
    """A random-weight AutoencoderKL saved with save_pretrained (2**(levels-1)x downsampling)."""
    import torch

    from data_prep.train_vae import build_vae

    torch.manual_seed(seed)
    vae = build_vae(resolution, block_out_channels, latent_channels, 1, None, True)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(path)
    return Path(path)


def make_tiny_tokenizer(out_prefix: str | Path, vocab_size: int = 300, extra_lines: Sequence[str] = ()) -> Path:
    """Train a small BPE tokenizer with our special ids on generated sentences; returns the .model path."""
    from data_prep.train_tokenizer import train_new

    rng = np.random.default_rng(0)
    corpus = Path(str(out_prefix) + ".corpus.txt")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(2000)]
    corpus.write_text("\n".join(list(lines) + list(extra_lines)) + "\n")
    train_new([str(corpus)], out_prefix, vocab_size=vocab_size, num_threads=1)
    return Path(str(out_prefix) + ".model")


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A deterministic random image of `size` (w, h) in `mode`, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L"))
    elif mode == "P":
        img = rgb.quantize(16)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"transparency": 0} if mode == "P" else {}))
    return buf.getvalue()


def caption(seed: int) -> str:
    """A deterministic short caption."""
    rng = np.random.default_rng(seed + 10_000)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))
