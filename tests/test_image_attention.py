"""model.image_attention: causal attention inside images changes exactly the spans of image
patches, the model then cannot see later patches, and generation honours it (KV cache included)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from inference import TransfusionGenerator
from model import TransfusionModel
from config import ModelConfig, SpecialTokens
from trainer.documents import Document, ImageSegment
from trainer.packing import SequencePacker, collate

TOK = SpecialTokens()
P = 4


def packed(image_attention: str):
    packer = SequencePacker(40, P, TOK, image_attention=image_attention)
    latent = torch.zeros(1, 2, 2)
    docs = [Document([np.array([1, 7, 8]), ImageSegment(latent, 1000), np.array([2])]),
            Document([np.array([1, 9, 10, 11, 2])]),
            Document([ImageSegment(latent, 500), np.array([1, 12, 2])])]
    for doc in docs:
        packer.add(doc)
    packer._close_row()
    return collate(packer.pop_rows(1), (1, 2, 2))


def rule_mask(batch, causal_images: bool) -> torch.Tensor:
    """The attention mask written from the rule, not from the spans: same document, key <= query,
    or (bidirectional) a patch sees every patch of its own image."""
    S = batch.tokens.shape[1]
    doc = torch.cumsum(batch.position_ids[0] == 0, 0)  # document id of each position
    img = torch.full((S,), -1)
    for k, (_, first, n) in enumerate(batch.image_slots.tolist()):
        img[first:first + n] = k
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = (doc[:, None] == doc[None, :]) & (k <= q)
    if not causal_images:
        mask |= (img[:, None] >= 0) & (img[:, None] == img[None, :])
    real = torch.arange(S) < int((batch.position_ids[0] != 0).nonzero().max()) + 1  # padding sees nothing
    return mask & real[:, None] & real[None, :]


def span_mask(batch) -> torch.Tensor:
    j = torch.arange(batch.tokens.shape[1])
    return (batch.kv_lo[0][:, None] <= j) & (j < batch.kv_hi[0][:, None])


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_spans_follow_the_rule(mode):
    batch = packed(mode)
    assert torch.equal(span_mask(batch), rule_mask(batch, causal_images=mode == "causal"))


def test_causal_changes_exactly_the_spans_of_image_patches():
    bi, ca = packed("bidirectional"), packed("causal")
    for name in ("tokens", "is_image", "position_ids", "kv_lo", "text_targets", "image_slots"):
        assert torch.equal(getattr(bi, name), getattr(ca, name)), name
    changed = (bi.kv_hi != ca.kv_hi)[0]
    patches = bi.is_image[0]
    assert changed.any() and not changed[~patches].any()
    last_patch = torch.tensor([first + n - 1 for _, first, n in bi.image_slots.tolist()])
    assert not changed[last_patch].any()  # the last patch sees its whole image either way


def test_a_causal_model_cannot_see_later_patches():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, latent_channels=1, latent_size=4,
                      patch_size=2, max_seq_len=40, image_attention="causal", attention="sdpa")
    torch.manual_seed(0)
    model = TransfusionModel(cfg).eval()
    batch = packed("causal")
    noisy = torch.randn(batch.num_images, 1, 4, 4)
    t = torch.tensor([100, 200])

    def eps(latents):
        with torch.no_grad():
            out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, latents, t)
        return out.noise_pred

    changed = noisy.clone()
    changed[0, :, 2:, 2:] += 1.0  # the last patch of the first image
    a, b = eps(noisy), eps(changed)
    # Patches are row-major 2x2 tiles: the first three patches of image 0 cannot see the fourth.
    torch.testing.assert_close(a[0, :, :2, :], b[0, :, :2, :], rtol=0, atol=0)
    torch.testing.assert_close(a[0, :, 2:, :2], b[0, :, 2:, :2], rtol=0, atol=0)
    assert not torch.equal(a[0, :, 2:, 2:], b[0, :, 2:, 2:])


def test_generation_honours_causal_images_with_the_kv_cache(folder, tmp_path):
    causal = tmp_path / "causal"
    shutil.copytree(folder, causal)
    config = json.loads((causal / "config.json").read_text())
    config["model"]["image_attention"] = "causal"
    (causal / "config.json").write_text(json.dumps(config))
    gen = TransfusionGenerator.from_folder(causal)
    assert gen.cfg.image_attention == "causal"
    kw = dict(mode="image", steps=4, cfg_scale=3.0, seed=1)
    cached, full = gen.generate([[5, 6, 7]], use_cache=True, **kw), gen.generate([[5, 6, 7]], use_cache=False, **kw)
    torch.testing.assert_close(cached[0].images[0], full[0].images[0], rtol=1e-4, atol=1e-4)
    bidirectional = TransfusionGenerator.from_folder(folder).generate([[5, 6, 7]], use_cache=True, **kw)
    assert not torch.allclose(cached[0].images[0], bidirectional[0].images[0], atol=1e-3)
