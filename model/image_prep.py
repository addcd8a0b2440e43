"""Image preprocessing, the one definition shared by data preparation and inference.

Training latents (data_prep.encode_latents, data_prep.train_vae) and prompt images at inference
(inference.images) must see the same pixels for the same file, or the model is prompted with latents
it was never trained on; so both call `load_image` here (inference may not import data_prep).

Decode with PIL (EXIF orientation applied; grayscale/CMYK/palette/16-bit converted to RGB; alpha
composited on white), resize the short side to the target resolution (bicubic, antialiased) and
center-crop, then scale to [-1, 1]. Failures raise `BadImage` with a reason that the reports count.

The latent scaling (`scale_latents`, `unscale_latents`) is defined here too, for the same reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail, not decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Skip reasons (the keys of the reports).
CORRUPT = "corrupt_image"
TRUNCATED = "truncated_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
ORIENTATION_TAG = 0x0112


class BadImage(Exception):
    """An input image that is skipped; `reason` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, I, F


def decode(data: bytes, resolution: int, min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB image with short side >= resolution*, original upright (height, width)).

    *For large JPEGs the DCT-domain draft mode decodes directly at a reduced scale that still
    covers `resolution`, which is several times faster than a full decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if min(w, h) < min_size:
                raise BadImage(TOO_SMALL, f"{w}x{h} < {min_size}")
            if img.format == "JPEG" and min(w, h) >= 2 * resolution:
                img.draft("RGB", (max(1, w * resolution // min(w, h)), max(1, h * resolution // min(w, h))))
            img.load()
            if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            img = to_rgb(ImageOps.exif_transpose(img))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(TOO_LARGE, str(e)) from None
    except UnidentifiedImageError as e:
        raise BadImage(CORRUPT, str(e)) from None
    except OSError as e:
        reason = TRUNCATED if "truncated" in str(e).lower() else CORRUPT
        raise BadImage(reason, str(e)) from None
    except Exception as e:  # PIL raises SyntaxError/ValueError/struct.error on some broken files
        raise BadImage(CORRUPT, f"{type(e).__name__}: {e}") from None
    return img, (h, w)


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side equals `resolution` (bicubic, antialiased), then center-crop square."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3]
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(data: bytes, resolution: int, min_size: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bytes -> ([3, resolution, resolution] in [-1, 1], original (height, width)); raises BadImage."""
    img, orig = decode(data, resolution, min_size)
    return to_tensor(resize_center_crop(img, resolution)), orig


def scale_latents(z: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """The VAE's raw latents -> the scaled latents the model trains on and the shards store:
    (z - shift_factor) * scaling_factor (data_prep.encode_latents, inference.images)."""
    if shift_factor is not None:
        z = z - shift_factor
    return z * scaling_factor


def unscale_latents(z: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Scaled latents (as stored/trained on) -> the VAE's raw latent space, ready for vae.decode."""
    z = z / scaling_factor
    return z + shift_factor if shift_factor is not None else z
