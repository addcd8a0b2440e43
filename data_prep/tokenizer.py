"""The data preparation side of the tokenizer: the sentencepiece wrapper is `model.tokenizer.Tokenizer`
(shared with inference); this module adds the `<name>.special_tokens.json` file that
`data_prep.train_tokenizer` writes next to the model (ids + vocab_size, readable without sentencepiece).
The training config's `model.tokens: {pad, bos, eos, boi, eoi}` must equal `Tokenizer.special_tokens()`
of the model the shards were made with.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.tokenizer import BOI_PIECE, EOI_PIECE, Tokenizer

__all__ = ["BOI_PIECE", "EOI_PIECE", "Tokenizer", "load_special_tokens", "special_tokens_path"]


def special_tokens_path(model_path: str | Path) -> Path:
    """`dir/name.model` -> `dir/name.special_tokens.json`."""
    p = Path(model_path)
    return p.with_name(p.stem + ".special_tokens.json")


def load_special_tokens(model_path: str | Path) -> dict:
    """Read the `<name>.special_tokens.json` written by train_tokenizer (ids + vocab_size)."""
    with open(special_tokens_path(model_path)) as f:
        return json.load(f)
