"""Documents: the unit the data layer hands to the packer, and how training examples become them.

A document is a list of segments, each with a role: text ids (trained: LM targets), `ContextText`
(read, not learned: no LM targets, e.g. an edit instruction) or one image's latent, generated
(noised to t < max_t, diffusion loss) or a condition (`max_t == CONDITION`: clean, t = 0, no loss,
e.g. an edit's input image). `DocumentBuilder` applies the
paper's recipe: caption first (80%) or image first (20%), noise limited to t < 500 when the
image precedes its caption, and caption dropout for classifier-free guidance (10% of all pairs
become an image alone, whatever the order drawn). Interleaved documents keep their stored order
and roles, or the stream's recipe (`DocumentRecipeConfig`), with its guidance dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Sequence

import numpy as np
import torch

from config import DocumentRecipeConfig, SpecialTokens


CONDITION = 0  # ImageSegment.max_t of a condition image: the model reads it clean (t = 0), no loss


@dataclass
class ImageSegment:
    latent: torch.Tensor  # [C, h, w] clean latent (already sampled from the stored distribution)
    max_t: int  # timesteps for this image are drawn from [0, max_t); CONDITION: clean, no loss


@dataclass
class ContextText:
    """Text the model reads but is not trained to write: no position predicts these ids."""

    ids: np.ndarray  # [L] int64


@dataclass
class Document:
    segments: list[np.ndarray | ContextText | ImageSegment] = field(default_factory=list)
    # Never split across packed rows, like a document with an image (set for VQ-token images, which
    # are plain ids to the packer but lose their caption when cut).
    keep_whole: bool = False

    def num_positions(self, patches_per_image: int) -> int:
        """Sequence length of the document once images become BOI + patches + EOI."""
        return sum(
            patches_per_image + 2 if isinstance(s, ImageSegment) else len(s.ids if isinstance(s, ContextText) else s)
            for s in self.segments
        )


@dataclass
class DocumentRecipe:
    """Probabilities of the recipe; values come from the data config."""

    image_first_prob: float = 0.2
    caption_dropout: float = 0.1
    image_first_max_t: int = 500
    num_timesteps: int = 1000


class DocumentBuilder:
    """Turns raw examples (text ids, caption ids + latent) into Documents, deterministically.

    Each call takes its own `np.random.Generator`, so a caller that seeds it from the example's
    index reproduces the same documents after a resume.
    """

    def __init__(self, tokens: SpecialTokens, recipe: DocumentRecipe) -> None:
        self.tokens = tokens
        self.recipe = recipe

    def text(self, ids: np.ndarray, add_bos_eos: bool = True) -> Document:
        ids = np.asarray(ids, dtype=np.int64)
        if add_bos_eos:
            ids = np.concatenate([[self.tokens.bos], ids, [self.tokens.eos]])
        return Document([ids])

    def image_caption(self, caption_ids: np.ndarray, latent: torch.Tensor, rng: np.random.Generator) -> Document:
        """An image-caption pair -> caption-first, image-first, or (caption dropped) image-only document.

        The order and the dropout are drawn independently, so `caption_dropout` of all pairs lose
        their caption whichever order was drawn. Without a caption the order means nothing: a dropped
        pair is always `BOS, image, EOS` with the full noise range, the unconditional example that
        classifier-free guidance needs (inference's unconditional prompt is BOS, BOI, ...).
        """
        caption = np.asarray(caption_ids, dtype=np.int64)
        bos = np.array([self.tokens.bos], dtype=np.int64)
        eos = np.array([self.tokens.eos], dtype=np.int64)
        r = self.recipe
        image_first = rng.random() < r.image_first_prob
        dropped = rng.random() < r.caption_dropout
        if dropped:
            return Document([bos, ImageSegment(latent, max_t=r.num_timesteps), eos])
        if image_first:
            # Image -> caption: limited noise so the model can read the image it captions.
            image = ImageSegment(latent, max_t=min(r.image_first_max_t, r.num_timesteps))
            return Document([bos, image, np.concatenate([caption, eos])])
        return Document([np.concatenate([bos, caption]), ImageSegment(latent, max_t=r.num_timesteps), eos])

    def image_tokens_caption(self, caption_ids: np.ndarray, image_ids: np.ndarray, rng: np.random.Generator) -> Document:
        """A caption + discrete image pair (ids already offset into the vocabulary) -> a text-only document.

        The image becomes `BOI, ids, EOI`, trained with the LM loss; the order and caption dropout
        are drawn exactly as in `image_caption` (same two draws, same probabilities), so the two
        representations see the same mix of caption-first, image-first and unconditional examples.
        """
        caption = np.asarray(caption_ids, dtype=np.int64)
        t = self.tokens
        image = np.concatenate([[t.boi], np.asarray(image_ids, dtype=np.int64), [t.eoi]])
        bos, eos = np.array([t.bos], dtype=np.int64), np.array([t.eos], dtype=np.int64)
        image_first = rng.random() < self.recipe.image_first_prob
        dropped = rng.random() < self.recipe.caption_dropout
        if dropped:
            parts = [bos, image, eos]
        elif image_first:
            parts = [bos, image, caption, eos]
        else:
            parts = [bos, caption, image, eos]
        return Document([np.concatenate(parts)], keep_whole=True)

    def interleaved(self, parts: Sequence[tuple[str, np.ndarray | torch.Tensor]], recipe: DocumentRecipeConfig,
                    rng: np.random.Generator) -> Document:
        """Stored parts in order, (role, ids) or (role, latent [C, h, w]) -> BOS, parts, EOS.

        Roles are the stored ones unless the recipe sets one for all text or all images; one draw
        decides the guidance dropout (context text, condition images, or both removed). A dropped
        part is gone from the sequence, as it is from the prompt inference compares against.
        """
        u = rng.random()
        a, b = recipe.drop_context, recipe.drop_context + recipe.drop_condition
        both = b <= u < b + recipe.drop_both
        drop = {"context": u < a or both, "condition": a <= u < b or both}
        t = self.tokens
        segments: list[np.ndarray | ContextText | ImageSegment] = [np.array([t.bos], dtype=np.int64)]
        for role, value in parts:
            if isinstance(value, torch.Tensor):
                role = role if recipe.image == "stored" else recipe.image
                if not drop.get(role, False):
                    segments.append(ImageSegment(value, CONDITION if role == "condition" else self.recipe.num_timesteps))
            else:
                role = role if recipe.text == "stored" else recipe.text
                ids = np.asarray(value, dtype=np.int64)
                if not drop.get(role, False):
                    segments.append(ContextText(ids) if role == "context" else ids)
        segments.append(np.array([t.eos], dtype=np.int64))
        return Document(segments, keep_whole=not recipe.split_long)
