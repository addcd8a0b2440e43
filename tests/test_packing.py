"""Packing semantics, checked against an independent dense-mask builder on many random packings.

The independent builder never looks at kv_lo/kv_hi: it recovers which document and which image
each position belongs to from the row's content (each document's text ids and latents encode the
document's number) and applies the Transfusion rule directly: causal within a document,
bidirectional within an image, nothing across documents, padding isolated.
"""

import pickle

import numpy as np
import pytest
import torch

from kernels import sdpa_span_attention, span_mask
from model.batch import IGNORE_INDEX
from config import SpecialTokens
from trainer.documents import Document, DocumentBuilder, DocumentRecipe, ImageSegment
from trainer.packing import SequencePacker, collate

TOK = SpecialTokens()
FIRST_ID = 10  # document k's text ids are FIRST_ID + k


def random_documents(rng, n_docs, P, seq_len):
    docs = []
    for k in range(n_docs):
        kind = rng.integers(4)
        ids = lambda n: np.full(n, FIRST_ID + k, dtype=np.int64)  # noqa: E731
        image = ImageSegment(torch.full((1, 2, 2), float(k)), max_t=1000)
        if kind == 0:  # text, possibly longer than a row
            segs = [ids(int(rng.integers(1, 2 * seq_len)))]
        elif kind == 1:  # caption first
            segs = [ids(int(rng.integers(0, 6)) + 1), image, ids(1)]
        elif kind == 2:  # image first
            segs = [ids(1), image, ids(int(rng.integers(0, 6)) + 1)]
        else:  # image alone, or two images
            segs = [image] if rng.random() < 0.5 else [ids(1), image, ids(2), ImageSegment(image.latent, 500)]
        if kind == 0 or Document(segs).num_positions(P) <= seq_len:
            docs.append(Document(segs))
    return docs


def expected_mask(tokens, is_image, slots_of_row, latents, P):
    """Dense [S, S] mask from content alone (see module docstring)."""
    S = len(tokens)
    doc = np.full(S, -1)
    image = np.full(S, -1)
    for n, (first, lat) in enumerate(zip(slots_of_row, latents)):
        k = int(lat.flatten()[0])
        doc[first - 1 : first + P + 1] = k  # BOI, patches, EOI
        image[first : first + P] = n
    text = (~is_image) & (doc < 0) & (tokens >= FIRST_ID)
    doc[text] = tokens[text] - FIRST_ID
    i, j = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    same_doc = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    same_image = (image[:, None] == image[None, :]) & (image[:, None] >= 0)
    return same_doc & ((j <= i) | same_image)


@pytest.mark.parametrize("seed", range(40))
def test_spans_match_independent_mask(seed):
    rng = np.random.default_rng(seed)
    P = int(rng.choice([1, 4, 9]))
    seq_len = int(rng.integers(P + 8, 96))
    packer = SequencePacker(seq_len, P, TOK, max_waiting=int(rng.integers(0, 4)))
    for d in random_documents(rng, 40, P, seq_len):
        packer.add(d)
    rows = packer.pop_rows(len(packer.ready))
    assert rows, "the random documents should fill at least one row"
    batch = collate(rows, (1, 2, 2))
    batch.check()
    got = span_mask(batch.kv_lo, batch.kv_hi)
    for r in range(len(rows)):
        sel = batch.image_slots[:, 0] == r
        want = expected_mask(
            batch.tokens[r].numpy(), batch.is_image[r].numpy(), batch.image_slots[sel, 1].tolist(),
            batch.latents[sel], P,
        )
        assert np.array_equal(got[r].numpy(), want), f"row {r}"
    # Padding sees nothing and is seen by nothing.
    pad = (batch.tokens == TOK.pad) & ~batch.is_image
    assert not got[pad].any() and not got.transpose(1, 2)[pad].any()
    # The SDPA reference equals attention written out with the independent mask.
    B, S = batch.tokens.shape
    q, k, v = (torch.randn(B, S, 2, 8, dtype=torch.float64) for _ in range(3))
    out = sdpa_span_attention(q, k, v, batch.kv_lo, batch.kv_hi)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / 8**0.5
    scores = scores.masked_fill(~got[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    assert torch.allclose(out, torch.einsum("bhij,bjhd->bihd", scores, v), atol=1e-10)


def test_targets_are_next_text_tokens_only():
    builder = DocumentBuilder(TOK, DocumentRecipe(image_first_prob=0.0, caption_dropout=0.0))
    packer = SequencePacker(32, 4, TOK)
    packer.add(builder.image_caption(np.array([20, 21]), torch.zeros(1, 2, 2), np.random.default_rng(0)))
    packer.add(builder.text(np.arange(30, 60)))
    b = collate(packer.pop_rows(1), (1, 2, 2))
    # Row: BOS 20 21 BOI p p p p EOI EOS | BOS 30 31 ... (split at the row end)
    t = b.text_targets[0].tolist()
    assert t[:4] == [20, 21, TOK.boi, IGNORE_INDEX]  # BOI predicts no patch
    assert t[4:8] == [IGNORE_INDEX] * 4  # patches predict nothing
    assert t[8:10] == [TOK.eos, IGNORE_INDEX]  # EOI -> EOS; nothing across documents
    assert t[10:13] == [30, 31, 32]
    # The split text document keeps the target of its last in-row position (next row's first id).
    assert t[31] == b.tokens[0, 31].item() + 1
    assert b.position_ids[0, 10].item() == 0 and b.kv_lo[0, 12].item() == 10


def test_image_longer_than_row_is_rejected():
    packer = SequencePacker(16, 16, TOK)
    with pytest.raises(ValueError, match=r"an image takes 18 positions \(16 patches \+ BOI/EOI\) but a row holds 16"):
        packer.add(Document([np.array([1]), ImageSegment(torch.zeros(1, 4, 4), 1000), np.array([2])]))


def test_waiting_images_keep_rows_full():
    """Image documents that do not fit wait for the next row while text fills the current one."""
    packer = SequencePacker(20, 8, TOK, max_waiting=2)
    image_doc = Document([np.array([1]), ImageSegment(torch.zeros(1, 2, 2), 1000), np.array([2])])  # 11
    for doc in [image_doc, image_doc, Document([np.arange(10, 40)])]:
        packer.add(doc)
    rows = packer.pop_rows(2)
    assert all(not ((r.tokens == TOK.pad) & ~r.is_image).any() for r in rows)  # no padding
    assert [len(r.images) for r in rows] == [1, 1]


def test_packer_state_round_trip():
    rng = np.random.default_rng(3)
    docs = random_documents(rng, 60, 4, 48)
    a = SequencePacker(48, 4, TOK)
    for d in docs[:30]:
        a.add(d)
    a.pop_rows(1)
    b = SequencePacker(48, 4, TOK)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for d in docs[30:]:
        a.add(d)
        b.add(d)
    n = len(a.ready)
    ra, rb = collate(a.pop_rows(n), (1, 2, 2)), collate(b.pop_rows(n), (1, 2, 2))
    for name in ("tokens", "kv_lo", "kv_hi", "text_targets", "latents", "image_slots"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name
