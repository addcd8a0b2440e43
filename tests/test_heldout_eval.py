"""Held-out evaluation (config `eval:`, trainer/evaluation.py, model/heldout.py): fixed stratified draws,
the LM loss split into text and captions, a finite held-out set read once, evaluations that repeat
exactly and leave training bitwise unchanged, bad eval streams refused in one line. The layouts'
agreement with one process is in test_parallel.py and test_deepspeed.py (held-out metrics there)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from model.batch import IGNORE_INDEX
from model.heldout import CONDITION_T, TARGET_KINDS, HeldoutBatch, HeldoutStats, bucket_range, fixed_draws, target_kinds
from tests.conftest import REPO
from tests.helpers import SHARD_LATENT, streaming_overrides, tiny_run_config, write_shards
from trainer.data import document_builder
from trainer.evaluation import Evaluator, heldout_rows
from trainer.packing import SequencePacker, collate
from trainer.train import process_env, train


def test_timesteps_are_stratified_and_each_image_keeps_its_draw():
    t, noise = fixed_draws(SHARD_LATENT, 0, 16, seed=3, num_timesteps=1000, n_buckets=8)
    assert (t * 8 // 1000).tolist() == [k % 8 for k in range(16)]  # image k in bucket k mod 8
    assert all(bucket_range(k % 8, 8, 1000)[0] <= t[k] < bucket_range(k % 8, 8, 1000)[1] for k in range(16))
    assert len(set(t.tolist())) == 16  # a draw inside the bucket, not its midpoint
    t2, noise2 = fixed_draws(SHARD_LATENT, 5, 3, seed=3, num_timesteps=1000, n_buckets=8)
    assert torch.equal(t2, t[5:8]) and torch.equal(noise2, noise[5:8])  # however the images are batched
    assert not torch.equal(fixed_draws(SHARD_LATENT, 0, 16, seed=4, num_timesteps=1000, n_buckets=8)[1], noise)
    assert bucket_range(2, 3, 10) == (7, 10)  # uneven ranges still tile [0, T)


def test_lm_targets_split_into_plain_text_and_captions(tiny_cfg):
    m = tiny_cfg.model
    builder = document_builder(tiny_cfg)
    packer = SequencePacker(64, m.patches_per_image, m.tokens)
    rng = np.random.default_rng(0)
    text, caption = np.arange(20, 30), np.arange(40, 45)
    builder.recipe.image_first_prob = builder.recipe.caption_dropout = 0.0
    packer.add(builder.text(text))  # BOS + 10 + EOS: 11 targets
    packer.add(builder.image_caption(caption, torch.zeros(SHARD_LATENT), rng))  # BOS + 5 before, EOI -> EOS after
    packer.flush()
    batch = collate(packer.pop_rows(1), SHARD_LATENT)
    kinds = target_kinds(batch, m.tokens.boi)
    counts = dict(zip(TARGET_KINDS, (kinds != IGNORE_INDEX).sum((1, 2)).tolist()))
    assert counts == {"text": 11, "caption": 6 + 1, "image_tokens": 0}
    assert torch.equal(torch.where(kinds[0] != IGNORE_INDEX, kinds[0], kinds[1]), batch.text_targets)
    vq = target_kinds(batch, m.tokens.boi, image_token_offset=43)  # pretend ids >= 43 are image codes
    assert (vq[2] != IGNORE_INDEX).sum() == 2 and (vq[1] != IGNORE_INDEX).sum() == 5


def test_a_condition_image_is_read_clean_and_scored_nowhere(tiny_cfg):
    """An edit document held out: its source (condition) image enters the model clean at t = 0 and adds
    nothing to any bucket; the generated image is noised and scored as before."""
    from model.diffusion import NoiseSchedule
    from model.transfusion import ModelOutput
    from trainer.documents import CONDITION, ContextText, Document, ImageSegment

    m = tiny_cfg.model
    packer = SequencePacker(64, m.patches_per_image, m.tokens)
    source, target = torch.ones(SHARD_LATENT), torch.full(SHARD_LATENT, 2.0)
    packer.add(Document([np.array([1]), ImageSegment(source, CONDITION), ContextText(np.arange(20, 24)),
                         ImageSegment(target, 1000), np.array([2])]))
    packer.flush()
    batch = collate(packer.pop_rows(1), SHARD_LATENT)
    t, noise = fixed_draws(SHARD_LATENT, 0, 2, seed=0, num_timesteps=1000, n_buckets=2)
    t[~batch.generated] = CONDITION_T
    hb = HeldoutBatch(batch, target_kinds(batch, m.tokens.boi), t, noise)
    schedule = NoiseSchedule(tiny_cfg.diffusion)
    noisy = hb.noisy_latents(schedule)
    assert torch.equal(noisy[0], source) and hb.model_timesteps.tolist() == [0, int(t[1])]
    torch.testing.assert_close(noisy[1], schedule.q_sample(target[None], t[1:], noise[1:])[0])
    stats = HeldoutStats(1000, 2)
    out = ModelOutput(torch.zeros(2, *SHARD_LATENT), torch.zeros(1, 64, 8), torch.nn.Identity())
    sums = stats(out, hb.targets, noise, t, lambda *a: torch.zeros(()))
    _, buckets = stats.split(sums)
    assert [n for _, n in buckets] == [0, 1]  # only the generated image (bucket 1 by its index)
    assert buckets[1][0] == pytest.approx(float((noise[1] ** 2).mean()))


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    write_shards(root / "train")
    write_shards(root / "held", n_images=6, n_texts=4, seed=1)
    return root


def heldout_overrides(root, *extra: str) -> list[str]:
    held = root / "held"
    return streaming_overrides(root / "train", "eval.every=2", f"eval.streams=[{{path: {held / 'images'}, kind: image}}, "
                               f"{{path: {held / 'text'}, kind: text}}]", *extra)


def test_held_out_streams_are_read_once_in_order(shard_sets, tmp_path):
    cfg = tiny_run_config(tmp_path, 128, *heldout_overrides(shard_sets, "eval.rows=1000"))
    rows = heldout_rows(cfg)
    assert len(rows) < 1000 and sum(len(r.images) for r in rows) == 6  # the set ends with its streams
    assert sum(int((r.tokens == cfg.model.tokens.bos).sum()) for r in rows) == 6 + 4  # each document once
    again = heldout_rows(cfg)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(rows, again))
    assert all(torch.equal(x[1], y[1]) for a, b in zip(rows, again) for x, y in zip(a.images, b.images))


def test_evaluation_repeats_exactly_and_leaves_training_bitwise_unchanged(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.model.n_layers, cfg.train.batch_size, cfg.train.seq_len, cfg.model.max_seq_len = 2, 2, 128, 128
    cfg.train.steps, cfg.logging.log_every, cfg.eval.rows = 4, 1, 8
    plain = [m["loss"] for m in train(cfg)]
    cfg.eval.every, cfg.train.output_dir = 2, str(tmp_path / "with_eval")
    assert [m["loss"] for m in train(cfg)] == plain  # bitwise
    rows = [json.loads(line) for line in (tmp_path / "with_eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/lm_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    buckets = [k for k in evals[0] if k.startswith("eval/diffusion_loss_t")]
    assert buckets[0] == "eval/diffusion_loss_t0-124" and len(buckets) <= 8
    assert evals[0]["eval/diffusion_loss"] == pytest.approx(np.mean([evals[0][k] for k in buckets]))
    for key in ("eval/text_lm_loss", "eval/caption_lm_loss", "eval/text_ppl", "eval/seconds"):
        assert evals[0][key] > 0, key
    assert evals[1]["eval/lm_loss"] < evals[0]["eval/lm_loss"]  # it learns, and the eval sees it

    from trainer.train import make_engine

    env = process_env(cfg)
    engine = make_engine(cfg, env)
    first, second = Evaluator(cfg, env).run(engine), Evaluator(cfg, env).run(engine)
    first.pop("eval/seconds"), second.pop("eval/seconds")
    assert first == second  # same weights, same numbers: nothing depends on when or how often


def test_bad_eval_streams_are_one_config_error_line(shard_sets, tmp_path):
    missing = streaming_overrides(shard_sets / "train", "eval.every=10",
                                  f"eval.streams=[{{path: {tmp_path / 'nowhere'}, kind: image}}]")
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
                           "--check", *missing], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("config error: eval.streams[0] (image stream) has no shards")
    overlap = streaming_overrides(shard_sets / "train", "eval.every=10",
                                  f"eval.streams=[{{path: {shard_sets / 'train' / 'text'}, kind: text}}]")
    with pytest.raises(ConfigError, match=r"eval.streams\[0\] .* holds data.streams\[1\]'s shards .* must not be trained on"):
        load_config(REPO / "configs" / "tiny.yaml", overlap)
    with pytest.raises(ConfigError, match="needs eval.streams"):
        load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(shard_sets / "train", "eval.every=10",
                                                                        "eval.streams=[]"))
