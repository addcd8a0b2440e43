"""Tiny synthetic assets for tests and benchmarks: a random-weight VAE, a small tokenizer, images.

Nothing here is used by the real pipeline; it exists so tests and benchmarks build the same small
things in one way (no network, seconds on 2 cores).
"""

from __future__ import annotations

import io
import json
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

    from .train_vae import build_vae

    torch.manual_seed(seed)
    vae = build_vae(resolution, block_out_channels, latent_channels, 1, None, True)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(path)
    return Path(path)


def make_tiny_tokenizer(out_prefix: str | Path, vocab_size: int = 300, extra_lines: Sequence[str] = ()) -> Path:
    """Train a small BPE tokenizer with our special ids on generated sentences; returns the .model path."""
    from .train_tokenizer import train_new

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


# (name, mode, format, size) of the good images of the mixed set: every decode path once or more.
GOOD_KINDS = [("rgb_png", "RGB", "PNG", (24, 20)), ("rgb_jpg", "RGB", "JPEG", (40, 30)),
              ("gray", "L", "PNG", (20, 24)), ("cmyk", "CMYK", "JPEG", (32, 32)),
              ("rgba", "RGBA", "PNG", (20, 20)), ("palette", "P", "PNG", (22, 18)),
              ("gray16", "I;16", "PNG", (18, 18)), ("la", "LA", "PNG", (16, 20)), ("bmp", "RGB", "BMP", (30, 17))]


def write_mixed_set(root: str | Path, n_good: int = 18) -> dict:
    """Images + a JSONL manifest with good samples and one or more of every bad-input reason.

    Returns {"manifest": path, "good": [keys in manifest order], "bad": {reason: count}}.
    """
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    good: list[str] = []
    for i in range(n_good):
        name, mode, fmt, size = GOOD_KINDS[i % len(GOOD_KINDS)]
        path = f"img/good_{i:03d}_{name}.{fmt.lower()}"
        (root / path).write_bytes(image_bytes(i, size, mode, fmt))
        rows.append(json.dumps({"path": path, "caption": caption(i)}))
        good.append(path)
    jpg = image_bytes(999, (48, 40), "RGB", "JPEG")
    (root / "img/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = bytearray(image_bytes(998, (30, 30)))
    png[100:116] = bytes(16)  # zeroed compressed pixel data: "broken data stream"
    (root / "img/corrupt.png").write_bytes(bytes(png))
    (root / "img/garbage.jpg").write_bytes(b"this is text, not an image")
    (root / "img/tiny.png").write_bytes(image_bytes(5, (4, 6)))
    (root / "img/ok_for_caption_tests.png").write_bytes(image_bytes(6))
    rows += [
        json.dumps({"path": "img/truncated.jpg", "caption": "cut in half"}),
        json.dumps({"path": "img/corrupt.png", "caption": "broken"}),
        json.dumps({"path": "img/garbage.jpg", "caption": "garbage"}),
        json.dumps({"path": "img/tiny.png", "caption": "too small"}),
        json.dumps({"path": "img/does_not_exist.png", "caption": "missing file"}),
        json.dumps({"path": "img/ok_for_caption_tests.png", "caption": ""}),
        json.dumps({"path": "img/ok_for_caption_tests.png", "caption": "   "}),
        json.dumps({"path": "img/ok_for_caption_tests.png"}),
        '{"path": "img/broken_json.png", "caption": ',
    ]
    order = np.random.default_rng(1).permutation(len(rows))  # interleave good and bad
    rows = [rows[i] for i in order]
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    bad = {"truncated_image": 1, "corrupt_image": 2, "too_small": 1, "unreadable": 1,
           "empty_caption": 2, "missing_caption": 1, "bad_manifest_line": 1}
    good_in_order = [json.loads(rows[i])["path"] for i in range(len(rows))
                     if rows[i].endswith("}") and json.loads(rows[i])["path"] in good]
    return {"manifest": root / "manifest.jsonl", "good": good_in_order, "bad": bad}
