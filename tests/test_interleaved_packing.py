"""Interleaved documents in the packer and the document builder: several images per document,
condition and generated images, cuts at text positions for documents longer than a row, and exact
accounting (every position of every document lands once in the rows, or is counted as skipped)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from config import DocumentRecipeConfig, SpecialTokens
from trainer.documents import CONDITION, ContextText, Document, DocumentBuilder, DocumentRecipe, ImageSegment
from trainer.packing import SequencePacker, collate

TOK = SpecialTokens()
P = 4  # patches per image (a 1x4x4 latent at patch size 2)


def latent(tag: int) -> torch.Tensor:
    return torch.full((1, 4, 4), float(tag))


def interleaved_doc(rng: np.random.Generator, tag: int, keep_whole: bool = False) -> Document:
    """BOS, then 1-5 images between text runs of 0-30 ids, EOS; ids and latents carry the document's tag."""
    segs: list = [np.array([TOK.bos])]
    for j in range(int(rng.integers(1, 6))):
        n = int(rng.integers(0, 31))
        if n:
            segs.append(np.full(n, 1000 * tag + j + 10, dtype=np.int64))
        segs.append(ImageSegment(latent(100 * tag + j), CONDITION if rng.random() < 0.3 else 1000))
    segs.append(np.array([TOK.eos]))
    return Document(segs, keep_whole=keep_whole)


def pack(docs: list[Document], seq_len: int) -> tuple[list, SequencePacker]:
    packer = SequencePacker(seq_len, P, TOK, max_waiting=2)
    for d in docs:
        packer.add(d)
    packer.flush()
    return packer.pop_rows(len(packer.ready)), packer


@pytest.mark.parametrize("seed", [0, 1])
def test_every_position_lands_once_and_no_image_is_cut(seed):
    """Random interleaved documents, many longer than a 40-position row: text ids and images (with
    their roles) come out exactly once; each image whole in one row (a piece does not see the piece
    before it, so pieces may land in any order)."""
    rng = np.random.default_rng(seed)
    docs = [interleaved_doc(rng, tag) for tag in range(1, 25)]
    seq_len = 40
    assert any(d.num_positions(P) > seq_len for d in docs)
    rows, packer = pack(docs, seq_len)
    assert not packer.skipped
    want_ids = Counter(int(i) for d in docs for s in d.segments if isinstance(s, np.ndarray) for i in s)
    want_images = sorted((float(s.latent[0, 0, 0]), s.max_t) for d in docs for s in d.segments
                         if isinstance(s, ImageSegment))
    got_ids = Counter(int(t) for r in rows for t in r.tokens[~r.is_image] if t not in (TOK.pad, TOK.boi, TOK.eoi))
    assert got_ids == want_ids
    got_images = []
    for r in rows:
        for first, lat, max_t in r.images:
            assert r.tokens[first - 1] == TOK.boi and r.tokens[first + P] == TOK.eoi  # whole, in this row
            assert r.is_image[first: first + P].all()
            got_images.append((float(lat[0, 0, 0]), max_t))
    assert sorted(got_images) == want_images
    positions = sum(d.num_positions(P) for d in docs)
    assert sum(int((r.tokens != TOK.pad).sum() + r.is_image.sum()) for r in rows) == positions
    batch = collate(rows, (1, 4, 4))  # condition images reach the batch as max_t 0, the others as sampled
    assert sorted(batch.image_max_t.tolist()) == sorted(m for _, m in want_images)


def test_a_long_document_is_cut_as_late_as_the_row_allows_and_restarts_its_spans():
    """Rows of 24. A: BOS, 10 ids, image, 20 ids, image, EOS (44): position 24 lies in text, so the
    first piece is a full row and the second starts with the next id at position 0. B: BOS, 20 ids,
    image (BOI at 21), ...: 24 would cut the image, so the cut moves before its BOI."""
    a = Document([np.array([TOK.bos]), np.arange(10, 20), ImageSegment(latent(1), 1000), np.arange(30, 50),
                  ImageSegment(latent(2), CONDITION), np.array([TOK.eos])])
    first, second = pack([a], 24)[0]
    assert ((first.tokens != TOK.pad) | first.is_image).all() and first.tokens[-1] == 36 and len(first.images) == 1
    assert second.tokens[0] == 37 and second.position_ids[0] == 0 and second.kv_lo[0] == 0
    assert [m for _, _, m in second.images] == [CONDITION] and second.kv_hi[0] == 1  # causal from the cut
    b = Document([np.array([TOK.bos]), np.arange(10, 30), ImageSegment(latent(1), 1000), np.arange(40, 45),
                  ImageSegment(latent(2), 1000), np.array([TOK.eos])])
    first, second = pack([b], 24)[0]
    assert (first.tokens[:21] != TOK.pad).all() and (first.tokens[21:] == TOK.pad).all() and not first.images
    assert second.tokens[0] == TOK.boi and len(second.images) == 2 and second.position_ids[0] == 0


def test_a_keep_whole_document_longer_than_a_row_is_skipped_and_counted():
    rng = np.random.default_rng(3)
    long = Document([np.array([TOK.bos]), ImageSegment(latent(1), CONDITION), np.arange(10, 40),
                     ImageSegment(latent(2), 1000), np.array([TOK.eos])], keep_whole=True)
    short = interleaved_doc(rng, 7)
    while short.num_positions(P) > 32:
        short = interleaved_doc(rng, 7)
    rows, packer = pack([long, short], 32)
    assert packer.skipped == {"documents": 1, "positions": long.num_positions(P)}
    assert all(float(lat[0, 0, 0]) >= 700 for r in rows for _, lat, _ in r.images)  # only the short one
    restored = SequencePacker(32, P, TOK)
    restored.load_state_dict(packer.state_dict())
    assert restored.skipped == packer.skipped


def builder() -> DocumentBuilder:
    return DocumentBuilder(TOK, DocumentRecipe(num_timesteps=1000))


EDIT = [("condition", latent(1)), ("context", np.array([20, 21])), ("generate", latent(2))]


def roles_of(doc: Document) -> list[str]:
    out = []
    for s in doc.segments[1:-1]:
        if isinstance(s, ImageSegment):
            out.append("condition" if s.max_t == CONDITION else "generate")
        else:
            out.append("context" if isinstance(s, ContextText) else "text")
    return out


def test_stored_roles_and_recipe_overrides():
    rng = np.random.default_rng(0)
    doc = builder().interleaved(EDIT, DocumentRecipeConfig(), rng)
    assert roles_of(doc) == ["condition", "context", "generate"] and not doc.keep_whole
    assert doc.segments[0].tolist() == [TOK.bos] and doc.segments[-1].tolist() == [TOK.eos]
    web = builder().interleaved(EDIT, DocumentRecipeConfig(text="text", image="generate", split_long=False), rng)
    assert roles_of(web) == ["generate", "text", "generate"] and web.keep_whole


def test_guidance_dropout_draws_disjoint_cases_at_the_configured_rates():
    recipe = DocumentRecipeConfig(drop_context=0.1, drop_condition=0.2, drop_both=0.3)
    cases = Counter(tuple(roles_of(builder().interleaved(EDIT, recipe, np.random.default_rng(i)))) for i in range(4000))
    rates = {k: v / 4000 for k, v in cases.items()}
    assert set(rates) == {("condition", "context", "generate"), ("condition", "generate"), ("context", "generate"),
                          ("generate",)}
    assert rates[("condition", "generate")] == pytest.approx(0.1, abs=0.02)  # instruction dropped
    assert rates[("context", "generate")] == pytest.approx(0.2, abs=0.02)  # input image dropped
    assert rates[("generate",)] == pytest.approx(0.3, abs=0.02)  # both: the unconditional case


def test_synthetic_multi_image_documents_and_their_row_limit(tmp_path):
    """data.synthetic.images_per_document=N: image documents hold 1..N captioned images (what the
    planner's multi-image memory figure runs on); one too long for a row is one config line."""
    from config import ConfigError, load_config
    from tests.conftest import REPO
    from trainer.data import document_builder
    from trainer.synthetic import SyntheticSource

    overrides = ["data.source=synthetic", "eval.every=0", "logging.wandb=disabled", "data.synthetic.images_per_document=4"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    source = SyntheticSource(cfg.data, cfg.model, document_builder(cfg), seed=0)
    counts = Counter(sum(isinstance(s, ImageSegment) for s in next(source).segments) for _ in range(300))
    assert set(counts) == {0, 1, 2, 3, 4}  # 0: the text documents
    with pytest.raises(ConfigError, match=r"^data.synthetic.images_per_document=4 makes documents of up to 90 "
                                          r"positions \(16 patches per image\), more than train.seq_len=64$"):
        load_config(REPO / "configs" / "tiny.yaml", overrides + ["train.seq_len=64"])
