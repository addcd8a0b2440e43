"""Inference: DCP checkpoint -> consolidated safetensors folder -> mixed-modal generation.

`python -m inference.convert CKPT_DIR OUT_DIR` writes the folder; `python -m inference.generate OUT_DIR
--prompt ...` samples from it (text, images with classifier-free guidance, captions, interleaved).
Names are imported lazily so that `python -m inference.<module>` runs each module only once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationConfig": "generate", "GenerationResult": "generate", "TransfusionGenerator": "generate",
    "InferenceConfig": "loading", "InferenceFolderError": "loading", "load_inference_model": "loading",
    "ImagePart": "prompts", "PromptError": "prompts",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
