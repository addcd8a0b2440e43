"""Text metrics of inference.evaluate: CIDEr and BLEU-4 of generated captions, held-out perplexity.

CIDEr and BLEU are pycocoevalcap's scorers (the COCO caption evaluation's own code, pure Python);
its PTB tokenizer needs Java, so captions are tokenized here the way it does for plain English
(lower case, punctuation dropped), and figures are comparable to published ones up to that step.
Perplexity is per text token exactly as training's held-out `eval/text_lm_loss`: each document is
BOS, its ids, EOS, every position after BOS is a target, over the model's whole vocabulary.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from model.transfusion import TransfusionModel

from .engine import RowState, build_layout

PUNCTUATION = re.compile(r"[^\w\s]|_")


def caption_tokens(text: str) -> str:
    """A caption as the COCO scorers expect it: lower case, words split on white space, no punctuation."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(captions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr (pycocoevalcap's CIDEr-D) and BLEU-1..4 of one caption per image against its references."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        from .image_scores import ScoreError

        raise ScoreError("CIDEr / BLEU need pycocoevalcap; install the eval extra: pip install -e '.[eval]'") from None
    keys = sorted(captions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"captions {missing[:5]} have no reference captions")
    res = {k: [caption_tokens(captions[k]) or "<empty>"] for k in keys}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in keys}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), **{f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}}


@torch.no_grad()
def text_nll(model: TransfusionModel, documents: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[float, int]:
    """(summed cross-entropy in nats, target count) of text documents (token ids without BOS/EOS);
    a document longer than the context keeps its first model.max_seq_len positions."""
    cfg, device = model.cfg, next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(documents), batch_size):
        rows = []
        for ids in documents[i:i + batch_size]:
            row = RowState()
            row.add_tokens(([cfg.tokens.bos, *ids, cfg.tokens.eos])[:cfg.max_seq_len])
            rows.append(row)
        width = max(len(r) for r in rows)
        lay = build_layout(rows, width, width, cfg, device)
        out = model(lay.tokens, lay.position_ids, lay.kv_lo, lay.kv_hi, lay.is_image, lay.latents, lay.timesteps)
        logits = out.logits[:, :-1].float()  # [R, W-1, V]: position c predicts c+1
        targets = lay.tokens[:, 1:]  # [R, W-1]
        real = torch.stack([torch.arange(width - 1, device=device) >= width - len(r) for r in rows])  # rows sit right-aligned
        total += float(F.cross_entropy(logits[real], targets[real], reduction="sum"))
        count += int(real.sum())
    return total, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")
