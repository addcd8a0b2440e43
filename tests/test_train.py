"""The single-process trainer: overfitting a fixed batch, a full run, loader resume, determinism."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from trainer.data import build_loader
from trainer.optim import lr_at
from trainer.train import make_engine, train


def test_overfits_fixed_batch(tiny_cfg):
    """200 steps on one fixed batch drive both losses far below their start."""
    tiny_cfg.train.batch_size = 2
    tiny_cfg.optim.warmup_steps = 10
    tiny_cfg.train.steps = 200
    batch = next(build_loader(tiny_cfg))
    assert batch.num_images > 0 and batch.num_text_tokens() > 0
    engine = make_engine(tiny_cfg)
    hist = [engine.train_step([batch], step) for step in range(200)]
    first_lm = sum(r.lm_loss for r in hist[:5]) / 5
    first_diff = sum(r.diffusion_loss for r in hist[:5]) / 5
    last_lm = sum(r.lm_loss for r in hist[-10:]) / 10
    last_diff = sum(r.diffusion_loss for r in hist[-10:]) / 10
    assert last_lm < 0.1 * first_lm, (first_lm, last_lm)
    assert last_diff < 0.5 * first_diff, (first_diff, last_diff)


def test_lr_schedule_shape(tiny_cfg):
    o = tiny_cfg.optim
    lrs = [lr_at(s, o, 300) for s in range(300)]
    assert lrs[0] == o.lr / o.warmup_steps and abs(lrs[o.warmup_steps - 1] - o.lr) < 1e-12
    assert abs(lrs[-1] - o.min_lr) < 1e-6 and all(a >= b for a, b in zip(lrs[o.warmup_steps:], lrs[o.warmup_steps + 1:]))


def test_full_run_logs_checkpoints_and_is_deterministic(tiny_cfg, tmp_path, capsys):
    tiny_cfg.train.steps = 6
    tiny_cfg.train.grad_accum = 2
    tiny_cfg.logging.log_every = 3
    tiny_cfg.checkpoint.enabled = True
    tiny_cfg.checkpoint.interval = 2
    tiny_cfg.logging.wandb = "offline"
    h1 = train(tiny_cfg)
    out = capsys.readouterr().out
    assert "step      3 | loss" in out and "tokens_per_s" in out
    ckpts = sorted(p.name for p in (tiny_cfg.output_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000006"]  # keep_last=2
    state = torch.load(tiny_cfg.output_dir / "checkpoints" / "step_00000006" / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["config"]["train"]["steps"] == 6
    assert state["tokens_seen"] == 6 * 2 * tiny_cfg.train.batch_size * tiny_cfg.train.seq_len
    assert "loader" in torch.load(tiny_cfg.output_dir / "checkpoints" / "step_00000006" / "rank_00000.pt", weights_only=True)
    assert list((tiny_cfg.output_dir / "wandb").glob("offline-run-*"))
    rows = [json.loads(line) for line in (tiny_cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    for row, window in zip(rows, (h1[:3], h1[3:])):  # a log line summarises the steps since the last
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert row[key] == pytest.approx(sum(m[key] for m in window) / 3, rel=1e-12), key
        assert row["lr"] == window[-1]["lr"] and row["tokens_seen"] == window[-1]["tokens_seen"]
    tiny_cfg.logging.wandb = "disabled"
    tiny_cfg.checkpoint.enabled = False
    tiny_cfg.checkpoint.resume = "none"  # a fresh run in the same folder, not a resume
    h2 = train(tiny_cfg)
    assert [m["loss"] for m in h1] == [m["loss"] for m in h2]  # bitwise reproducible


def test_loader_resume_yields_identical_batches(tiny_cfg):
    loader = build_loader(tiny_cfg)
    for _ in range(3):
        next(loader)
    state = pickle.dumps(loader.state_dict())
    expected = [next(loader) for _ in range(3)]
    fresh = build_loader(tiny_cfg)
    fresh.load_state_dict(pickle.loads(state))
    for want, got in zip(expected, (next(fresh) for _ in range(3))):
        for name in ("tokens", "kv_lo", "kv_hi", "text_targets", "latents", "image_slots", "image_max_t"):
            assert torch.equal(getattr(want, name), getattr(got, name)), name


def test_step_loss_is_the_mean_over_all_tokens_and_images_of_its_micro_batches(tiny_cfg):
    """Two micro-batches with different amounts of text and images: the step's losses weigh every
    text target and every image once (a mean of per-micro-batch means would not)."""
    tiny_cfg.train.grad_accum = 2
    engine = make_engine(tiny_cfg)
    batches = []
    for fraction in (0.8, 0.2):  # mostly text, then mostly images
        tiny_cfg.data.text_fraction = fraction
        batches.append(next(build_loader(tiny_cfg)))
    texts, images = [b.num_text_tokens() for b in batches], [b.num_images for b in batches]
    assert texts[0] != texts[1] and images[0] != images[1]
    ce, mse = [], []
    with torch.no_grad():
        for micro, b in enumerate(batches):
            noisy, t, noise = engine.objective.inputs(b, 0, micro)
            out = engine.parts[0](b.tokens, b.position_ids, b.kv_lo, b.kv_hi, b.is_image, noisy, t)
            ce.append(F.cross_entropy(out.logits.flatten(0, 1), b.text_targets.flatten(), ignore_index=-100,
                                      reduction="sum").item())
            mse.append((out.noise_pred - noise).pow(2).flatten(1).mean(1).sum().item())
    result = engine.train_step(batches, 0)
    assert result.lm_loss == pytest.approx(sum(ce) / sum(texts), rel=1e-5)
    assert result.diffusion_loss == pytest.approx(sum(mse) / sum(images), rel=1e-5)
    # The batches are different enough that a mean of means would be outside those tolerances.
    lm_means, diffusion_means = (ce[0] / texts[0] + ce[1] / texts[1]) / 2, (mse[0] / images[0] + mse[1] / images[1]) / 2
    assert abs(lm_means - result.lm_loss) > 10 * 1e-5 * result.lm_loss
    assert abs(diffusion_means - result.diffusion_loss) > 10 * 1e-5 * result.diffusion_loss


def test_logs_report_model_flops_and_mfu(tiny_cfg):
    """Achieved model TFLOP/s = the step's model FLOPs (model/flops.py) over the window's
    seconds; MFU divides by the GPUs' peak (given on CUDA, absent on CPU)."""
    from model.flops import step_model_flops
    from trainer.metrics import window_summary

    tiny_cfg.train.steps = 2
    history = train(tiny_cfg)
    assert all(h["model_flops"] > 0 for h in history)
    first = next(build_loader(tiny_cfg))
    assert history[0]["model_flops"] == step_model_flops(tiny_cfg.model, [first])
    logged = json.loads((tiny_cfg.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["model_tflops_per_s"] > 0 and "mfu" not in logged  # CPU: no peak to divide by
    rows = [{**h, "step_s": 2.0, "model_flops": 3e12} for h in history]
    summary = window_summary(rows, peak_flops=6e12)
    assert summary["model_tflops_per_s"] == 1.5 and summary["mfu"] == 0.25
