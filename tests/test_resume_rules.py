"""What may change on resume: a new packed length is refused in one line (the saved rows are laid out
for the old one), the attention kernel may change (same model); the loop's metrics history is bounded."""

from __future__ import annotations

import pytest

import trainer.metrics as metrics
from config import ConfigError
from tests.helpers import checkpoint_manager
from trainer.train import make_engine


def test_another_seq_len_is_refused_in_one_line_and_another_kernel_is_not(tiny_cfg, tmp_path):
    engine = make_engine(tiny_cfg)
    path = checkpoint_manager(tiny_cfg, engine, tmp_path, keep_last=1)[0].save(1)
    longer = tiny_cfg.to_dict()
    longer["train"]["seq_len"] = 2 * tiny_cfg.train.seq_len
    with pytest.raises(ConfigError, match=rf"train.seq_len: {tiny_cfg.train.seq_len} -> {2 * tiny_cfg.train.seq_len} "
                                          r"\(the loader's saved half-packed rows") as e:
        checkpoint_manager(tiny_cfg, engine, tmp_path, config=longer)[0].load(path)
    assert "\n" not in str(e.value)
    kernel = tiny_cfg.to_dict()
    kernel["model"]["attention"] = "triton" if tiny_cfg.model.attention != "triton" else "sdpa"
    assert checkpoint_manager(tiny_cfg, engine, tmp_path, config=kernel)[0].load(path) == path


def test_metrics_history_keeps_the_latest_rows_and_windows_stay_whole(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "HISTORY_ROWS", 5)
    logged = []
    logger = metrics.MetricsLogger(tiny_cfg.logging, tmp_path, {}, enabled=False)
    monkeypatch.setattr(logger, "log", lambda step, m: logged.append((step, m)))
    logger.cfg.log_every = 4
    for step in range(1, 13):
        logger.record(step, {"loss": float(step), "lm_loss": 0.0, "diffusion_loss": 0.0, "grad_norm": 0.0,
                             "step_s": 1.0, "tokens_per_s": 1.0, "tokens_seen": step, "lr": 0.0})
    assert [r["loss"] for r in logger.history] == [8.0, 9.0, 10.0, 11.0, 12.0]
    assert [(s, m["loss"]) for s, m in logged] == [(4, 2.5), (8, 6.5), (12, 10.5)]
