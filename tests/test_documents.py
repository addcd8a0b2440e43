"""The image-caption recipe: order, caption dropout for classifier-free guidance, noise limits."""

import numpy as np
import pytest
import torch

from config import SpecialTokens
from trainer.documents import DocumentBuilder, DocumentRecipe, ImageSegment

TOK = SpecialTokens()
CAPTION = np.array([20, 21, 22])
N = 10_000


def kinds(recipe: DocumentRecipe) -> dict[str, int]:
    """Build N documents (one generator per draw, as the sources seed them) and count their kinds."""
    builder = DocumentBuilder(TOK, recipe)
    latent = torch.zeros(1, 2, 2)
    counts = {"caption_first": 0, "image_first": 0, "dropped": 0}
    for i in range(N):
        segs = builder.image_caption(CAPTION, latent, np.random.default_rng([0, i])).segments
        image = next(s for s in segs if isinstance(s, ImageSegment))
        text = np.concatenate([s for s in segs if not isinstance(s, ImageSegment)])
        if not np.isin(CAPTION, text).any():
            # Unconditional: BOS, the image over the full noise range, EOS.
            assert len(segs) == 3 and segs[0].tolist() == [TOK.bos] and segs[2].tolist() == [TOK.eos]
            assert image.max_t == recipe.num_timesteps
            counts["dropped"] += 1
        elif isinstance(segs[1], ImageSegment) and segs[0].tolist() == [TOK.bos]:
            assert image.max_t == recipe.image_first_max_t and segs[2].tolist() == [*CAPTION, TOK.eos]
            counts["image_first"] += 1
        else:
            assert segs[0].tolist() == [TOK.bos, *CAPTION] and image.max_t == recipe.num_timesteps
            counts["caption_first"] += 1
    return counts


def test_caption_dropout_is_ten_percent_of_all_pairs():
    c = kinds(DocumentRecipe(image_first_prob=0.2, caption_dropout=0.1))
    assert abs(c["dropped"] / N - 0.10) <= 0.01, c
    # The order is drawn independently: 20% of the captioned pairs are image-first.
    assert abs(c["image_first"] / N - 0.2 * 0.9) <= 0.01, c


@pytest.mark.parametrize("image_first_prob", [0.0, 1.0])
def test_caption_dropout_whatever_the_order(image_first_prob):
    c = kinds(DocumentRecipe(image_first_prob=image_first_prob, caption_dropout=0.1))
    assert abs(c["dropped"] / N - 0.10) <= 0.01, c
    kept = "image_first" if image_first_prob == 1.0 else "caption_first"
    assert c[kept] + c["dropped"] == N, c


def test_no_dropout_keeps_every_caption():
    c = kinds(DocumentRecipe(image_first_prob=0.2, caption_dropout=0.0))
    assert c["dropped"] == 0
