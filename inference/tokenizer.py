"""Sentencepiece text tokenizer for inference, checked against the model config's special ids.

The model config's `tokens` (pad, bos, eos, boi, eoi) are authoritative; the sentencepiece model
must agree with them (the data_prep tokenizer names BOI/EOI `<boi>`/`<eoi>`) and fit the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from config import ModelConfig

BOI_PIECE, EOI_PIECE = "<boi>", "<eoi>"


class TokenizerError(ValueError):
    """A tokenizer that does not fit the model, or text it cannot encode."""


class TextTokenizer:
    """Encode/decode plain text; special tokens never come out of `encode`."""

    def __init__(self, path: str | Path, cfg: ModelConfig) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"sentencepiece model '{self.path}' does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.tokens = cfg.tokens
        size = self.sp.get_piece_size()
        if size > cfg.vocab_size:
            raise TokenizerError(f"tokenizer '{self.path}' has {size} pieces but the model's vocab_size is {cfg.vocab_size}")
        found = {"pad": self.sp.pad_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id()}
        for name, piece in (("boi", BOI_PIECE), ("eoi", EOI_PIECE)):
            i = self.sp.piece_to_id(piece)
            found[name] = -1 if i == self.sp.unk_id() else i
        bad = {n: (i, getattr(self.tokens, n)) for n, i in found.items() if i >= 0 and i != getattr(self.tokens, n)}
        if bad:
            detail = ", ".join(f"{n}: tokenizer {i} vs config {c}" for n, (i, c) in bad.items())
            raise TokenizerError(f"tokenizer '{self.path}' special ids differ from the model config's tokens ({detail})")
        self.special_ids = set(vars(self.tokens).values())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; a literal special piece such as '<boi>' in the text is refused."""
        ids = self.sp.encode(text)
        special = sorted({self.sp.id_to_piece(i) for i in ids if i in self.special_ids})
        if special:
            raise TokenizerError(
                f"the text contains the special piece(s) {special}; write special tokens as "
                f"<|bos|>, <|eos|>, <|boi|> and pass images as image parts"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size])
