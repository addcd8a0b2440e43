"""The sentencepiece tokenizer with the Transfusion special tokens (pad, bos, eos, <boi>, <eoi>):
the one wrapper that data preparation (data_prep.*) and inference (inference.prompts/generate) use.

`Tokenizer(path)` (data preparation) requires all five special tokens; `Tokenizer(path, cfg)`
(inference) checks them against the model config's `tokens`, which are authoritative, and that the
pieces fit `cfg.vocab_size`. Every error is a one-line `TokenizerError` (a ValueError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from config import ModelConfig

BOI_PIECE, EOI_PIECE = "<boi>", "<eoi>"


class TokenizerError(ValueError):
    """A tokenizer that is missing or does not fit the model, or text it cannot encode."""


class Tokenizer:
    """Encode/decode text with a sentencepiece model and expose the special token ids."""

    def __init__(self, model_path: str | Path, cfg: ModelConfig | None = None) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(
                f"sentencepiece model '{self.path}' does not exist; train one with "
                f"`python -m data_prep.train_tokenizer --input <text files> --out <prefix>`"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        found = {"pad": self.sp.pad_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id()}
        for name, piece in (("boi", BOI_PIECE), ("eoi", EOI_PIECE)):
            i = self.sp.piece_to_id(piece)
            found[name] = -1 if i == self.sp.unk_id() else i  # -1: the model has no such token
        if cfg is None:
            self._check_complete(found)
            self._ids = found
        else:
            self._check_model(found, cfg)
            self._ids = dict(vars(cfg.tokens))
        self.special_ids = set(self._ids.values())

    def _check_complete(self, found: dict[str, int]) -> None:
        missing = [n for n, i in found.items() if i < 0]
        if missing:
            raise TokenizerError(
                f"{self.path} lacks special tokens {missing}; add them with "
                f"`python -m data_prep.train_tokenizer --base {self.path} --out <prefix>`"
            )

    def _check_model(self, found: dict[str, int], cfg: ModelConfig) -> None:
        size = self.sp.get_piece_size()
        if size > cfg.vocab_size:
            raise TokenizerError(f"tokenizer '{self.path}' has {size} pieces but the model's vocab_size is {cfg.vocab_size}")
        bad = {n: (i, getattr(cfg.tokens, n)) for n, i in found.items() if i >= 0 and i != getattr(cfg.tokens, n)}
        if bad:
            detail = ", ".join(f"{n}: tokenizer {i} vs config {c}" for n, (i, c) in bad.items())
            raise TokenizerError(f"tokenizer '{self.path}' special ids differ from the model config's tokens ({detail})")

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

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text -> ids; a literal special piece such as '<boi>' in the text is refused."""
        ids = self.sp.encode(text)
        special = sorted({self.sp.id_to_piece(i) for i in ids if i in self.special_ids})
        if special:
            raise TokenizerError(
                f"the text contains the special piece(s) {special}; write special tokens as "
                f"<|bos|>, <|eos|>, <|boi|> and pass images as image parts"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special ids (pad, bos, eos, boi, eoi) and ids past the vocabulary decode to nothing."""
        return self.sp.decode([int(i) for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size])
