"""Inference's tokenizer is `model.tokenizer.Tokenizer` (shared with data preparation), built as
`TextTokenizer(path, cfg)`: the model config's `tokens` are authoritative and the sentencepiece model
must agree with them and fit the vocabulary; `encode_prompt` refuses literal special pieces and
`decode` drops special ids.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer as TextTokenizer, TokenizerError

__all__ = ["TextTokenizer", "TokenizerError"]
