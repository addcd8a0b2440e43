"""Image decoding and preprocessing for train_vae and encode_latents: re-exported from
`model.image_prep`, where inference shares the same definition (see that module)."""

from model.image_prep import (  # noqa: F401 (re-exports)
    CORRUPT,
    ORIENTATION_TAG,
    TOO_LARGE,
    TOO_SMALL,
    TRUNCATED,
    UNREADABLE,
    BadImage,
    decode,
    load_image,
    resize_center_crop,
    to_rgb,
    to_tensor,
)

__all__ = [
    "BadImage", "CORRUPT", "ORIENTATION_TAG", "TOO_LARGE", "TOO_SMALL", "TRUNCATED", "UNREADABLE",
    "decode", "load_image", "resize_center_crop", "to_rgb", "to_tensor",
]
