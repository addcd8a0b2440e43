"""Sentencepiece tokenizer with the Transfusion special tokens (pad, bos, eos, <boi>, <eoi>).

The training config's `model.tokens: {pad, bos, eos, boi, eoi}` must equal `special_tokens()` of
the model the shards were made with; `data_prep.train_tokenizer` writes them next to the model as
`<name>.special_tokens.json` so the trainer can check without loading sentencepiece.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import sentencepiece as spm

BOI_PIECE = "<boi>"
EOI_PIECE = "<eoi>"
PAD_PIECE = "<pad>"
SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi")


def special_tokens_path(model_path: str | Path) -> Path:
    """`dir/name.model` -> `dir/name.special_tokens.json`."""
    p = Path(model_path)
    return p.with_name(p.stem + ".special_tokens.json")


class Tokenizer:
    """Encode/decode text with a sentencepiece model and expose the special token ids."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model {self.path} not found; train one with "
                f"`python -m data_prep.train_tokenizer --input <text files> --out <prefix>`"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        ids = {
            "pad": self.sp.pad_id(),
            "bos": self.sp.bos_id(),
            "eos": self.sp.eos_id(),
            "boi": self.sp.piece_to_id(BOI_PIECE),
            "eoi": self.sp.piece_to_id(EOI_PIECE),
        }
        unk = self.sp.unk_id()
        missing = [n for n, i in ids.items() if i < 0 or (n in ("boi", "eoi") and i == unk)]
        if missing:
            raise ValueError(
                f"{self.path} lacks special tokens {missing}; add them with "
                f"`python -m data_prep.train_tokenizer --base {self.path} --out <prefix>`"
            )
        self._ids = ids

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def boi_id(self) -> int:
        return self._ids["boi"]

    @property
    def eoi_id(self) -> int:
        return self._ids["eoi"]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def special_tokens(self) -> dict[str, int]:
        """{pad, bos, eos, boi, eoi} -> id; the same mapping as the config's `model.tokens`."""
        return dict(self._ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids; BOS/EOS only when asked (captions are stored without them)."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> ids (no BOS/EOS), using sentencepiece's threaded batch encoder."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special/control ids (pad, bos, eos, boi, eoi) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def check_config(self, tokens: Mapping[str, int], vocab_size: int) -> None:
        """Raise ValueError naming the config key to fix if `tokens`/`vocab_size` disagree with us."""
        check_special_tokens(self.special_tokens(), self.vocab_size, tokens, vocab_size, str(self.path))


def check_special_tokens(
    actual: Mapping[str, int],
    actual_vocab: int,
    tokens: Mapping[str, int],
    vocab_size: int,
    source: str = "tokenizer",
) -> None:
    """Compare a config's `model.tokens` and `model.vocab_size` with a tokenizer's real ids."""
    wrong = [f"model.tokens.{n}={tokens.get(n)} but {source} has {actual[n]}"
             for n in SPECIAL_NAMES if tokens.get(n) != actual[n]]
    if vocab_size < actual_vocab:
        wrong.append(f"model.vocab_size={vocab_size} is below the tokenizer's {actual_vocab}")
    if wrong:
        raise ValueError("tokenizer/config mismatch: " + "; ".join(wrong))


def load_special_tokens(model_path: str | Path) -> dict:
    """Read the `<name>.special_tokens.json` written by train_tokenizer (ids + vocab_size)."""
    with open(special_tokens_path(model_path)) as f:
        return json.load(f)
