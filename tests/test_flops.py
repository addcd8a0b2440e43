"""The one model-FLOP count (model/flops.py): against first principles (linear codec), against the
planner's FLOP counter over a real training step (both codecs, VQ-token images), and against the
earlier hand count (parallel/plan_flops.py, now removed) at 7B shapes on meta."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from config import load_config
from kernels.dispatch import _BACKENDS, register_backend, unregister_backend
from model import Objective, TransfusionModel
from model.batch import IGNORE_INDEX, PackedBatch
from model.flops import Flops, batch_flops, model_flops_per_token, span_pairs, step_model_flops, unit_flops
from tests.conftest import REPO
from trainer.data import build_loader
from trainer.documents import Document
from trainer.packing import SequencePacker, collate

SYNTHETIC = ["data.source=synthetic", "data.text_fraction=0.2", "checkpoint.enabled=false", "logging.wandb=disabled"]
CODES = 16  # VQ codebook of the token variant


def _cfg(name: str = "tiny.yaml", *overrides: str):
    return load_config(REPO / "configs" / name, SYNTHETIC + list(overrides))


def _token_cfg():
    """tiny as the VQ-token variant (its data, token shards, is made up in `_token_batch`)."""
    cfg = _cfg()
    m = cfg.model
    m.image_representation, m.vocab_size = "tokens", 2000 + CODES
    m.image_token_offset, m.image_codebook_size = 2000, CODES
    m.validate()
    return cfg


def _token_batch(cfg) -> PackedBatch:
    """A packed batch of the VQ-token variant: captions and BOI, codes, EOI, all ordinary ids."""
    m, t = cfg.model, cfg.model.tokens
    rng = np.random.default_rng(0)
    packer = SequencePacker(cfg.train.seq_len, m.patches_per_image, t)
    rows = None
    while rows is None:
        caption = rng.integers(5, 2000, rng.integers(4, 40))
        codes = 2000 + rng.integers(0, CODES, m.patches_per_image)
        packer.add(Document([np.concatenate([[t.bos], caption, [t.boi], codes, [t.eoi, t.eos]]).astype(np.int64)]))
        rows = packer.pop_rows(cfg.train.batch_size)
    return collate(rows, (m.latent_channels, m.latent_size, m.latent_size))


def test_linear_codec_count_from_first_principles():
    """tiny (linear codec, GQA): every matmul written out; 2 FLOPs a multiply-add, backward 2x forward
    except the layers whose input needs no gradient (noisy latents, timestep features): 1x."""
    cfg = _cfg()
    m, b = cfg.model, next(build_loader(cfg))
    d, hd, L = m.d_model, m.head_dim, m.n_layers
    layer = 2 * d * (m.n_heads * hd + 2 * m.kv_heads * hd) + 2 * m.n_heads * hd * d + 3 * 2 * d * m.hidden_dim
    cp2, P = m.latent_channels * m.patch_size ** 2, m.patches_per_image
    enc_in, time_1, time_2, dec = 2 * cp2 * d * P, 2 * 256 * d, 2 * d * d, 2 * d * cp2 * P
    positions, targets = b.tokens.numel(), int((b.text_targets != IGNORE_INDEX).sum())
    pairs = int((b.kv_hi.long() - b.kv_lo.long()).sum())
    assert b.num_images > 0 and 0 < targets < positions
    expected = {
        "blocks": Flops(L * layer * positions, 2 * L * layer * positions),
        "attention": Flops(4 * hd * m.n_heads * L * pairs, 8 * hd * m.n_heads * L * pairs),
        "lm_head": Flops(2 * d * m.vocab_size * targets, 4 * d * m.vocab_size * targets),
        "patch_codecs": Flops((enc_in + time_1 + time_2 + dec) * b.num_images,
                              (enc_in + time_1 + 2 * time_2 + 2 * dec) * b.num_images),
    }
    assert batch_flops(m, b) == expected
    assert step_model_flops(m, [b, b]) == 2 * sum(f.total for f in expected.values())
    assert model_flops_per_token(m, b) == pytest.approx(step_model_flops(m, [b]) / positions)
    S = cfg.train.seq_len  # text only: causal rows, (S + 1) / 2 keys per query, every position a target
    assert model_flops_per_token(m, seq_len=S) == pytest.approx(
        3 * (L * layer + 2 * d * m.vocab_size) + 12 * hd * m.n_heads * L * (S + 1) / 2)


def _no_work_attention(q, k, v, kv_lo, kv_hi, scale=None):  # noqa: ANN001, ANN202
    """Attention without matmuls (gradients still reach q, k and v): the test's stand-in."""
    return q + 0.0 * (k.sum() + v.sum())


@pytest.mark.parametrize("variant", ["linear", "unet", "tokens"])
def test_count_equals_the_planner_counter_on_a_real_step(variant):
    """A real CPU forward + loss + backward of the model on a real packed batch, every matmul/conv
    counted by the planner's dispatch counter (recompute kept apart), equals the count without
    attention, exactly; the VQ-token variant has no patch-codec work and its codes are LM targets."""
    from planner.runtime import Counter

    cfg = _token_cfg() if variant == "tokens" else _cfg("tiny.yaml", f"model.patch_codec={variant}")
    batch = _token_batch(cfg) if variant == "tokens" else next(build_loader(cfg))
    cfg.model.attention = "test_no_work"
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model)
    counter = Counter()
    register_backend("test_no_work", _no_work_attention, lambda q, kv_lo=None, kv_hi=None: None, 99, ())
    try:
        with counter:
            loss = Objective(cfg.diffusion)(model, batch, 0, 0)
            counter.phase = "backward"
            loss.total.backward()
    finally:
        unregister_backend("test_no_work")
    parts = batch_flops(cfg.model, batch)
    assert counter.phases["recompute"].flops > 0  # the chunked cross-entropy's head, not model work
    assert counter.phases["forward"].flops == sum(f.forward for k, f in parts.items() if k != "attention")
    assert counter.phases["backward"].flops == sum(f.backward for k, f in parts.items() if k != "attention")
    assert parts["attention"].forward == 4 * cfg.model.head_dim * cfg.model.n_heads * cfg.model.n_layers * \
        span_pairs(batch.kv_lo, batch.kv_hi)
    if variant == "tokens":
        codes = (batch.text_targets >= 2000).sum()
        assert batch.num_images == 0 and parts["patch_codecs"].total == 0 and codes > 0
        assert parts["lm_head"].forward == 2 * cfg.model.d_model * cfg.model.vocab_size * (
            batch.text_targets != IGNORE_INDEX).sum()
    else:
        assert parts["patch_codecs"].total > 0


def test_7b_shapes_on_meta_equal_the_hand_count():
    """configs/7b.yaml (U-Net codec) measured on the meta device: the blocks and head from the
    formulas, the U-Net codec per image as the earlier hand-written mirror counted it."""
    m = _cfg("7b.yaml").model
    u = unit_flops(m)
    d, hd, L = m.d_model, m.head_dim, m.n_layers
    layer = 2 * d * (m.n_heads * hd + 2 * m.kv_heads * hd) + 2 * m.n_heads * hd * d + 3 * 2 * d * m.hidden_dim
    assert u.per_position == Flops(L * layer, 2 * L * layer) == Flops(12952010752, 25904021504)
    assert u.per_target == Flops(2 * d * m.vocab_size, 4 * d * m.vocab_size)
    assert u.per_image == Flops(193949859840, 387777036288)  # the removed parallel/plan_flops.codec_flops(7B, 1)
    assert u.per_pair == Flops(4 * hd * m.n_heads * L, 8 * hd * m.n_heads * L)
    assert model_flops_per_token(m, seq_len=4096) / 1e9 == pytest.approx(42.86, abs=0.01)


def test_measured_once_per_config_and_cheap_after():
    cfg = _cfg("160m.yaml")
    first = unit_flops(cfg.model)
    assert "_model_flops_no_attention" not in _BACKENDS  # the stand-in is gone after measuring
    batch = next(build_loader(cfg))
    t0 = time.perf_counter()
    for _ in range(10):
        step_model_flops(cfg.model, [batch])
    assert (time.perf_counter() - t0) / 10 < 0.05
    assert unit_flops(cfg.model) is first
    cfg.model.n_layers += 1  # another config: measured anew
    assert unit_flops(cfg.model).per_position.forward > first.per_position.forward
