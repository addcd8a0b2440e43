"""Data prefetching (trainer/prefetch.py, `data.prefetch`): the same batches, losses and checkpointed
loader position as without it; loader errors reach the caller; the thread stops on every exit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from config import ConfigError
from tests.conftest import REPO
from tests.helpers import batch_digest, one_thread  # noqa: F401 (autouse)
from trainer.data import build_loader
from trainer.prefetch import THREAD_NAME, StepPrefetcher
from trainer.train import main, train


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def small(cfg):
    cfg.model.n_layers, cfg.train.batch_size, cfg.train.seq_len, cfg.model.max_seq_len = 2, 2, 128, 128
    return cfg


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FailingLoader:
    """Yields `good` batches of a real loader, then raises `error` (from inside the prefetch thread)."""

    def __init__(self, loader, good: int, error: BaseException) -> None:
        self.loader, self.good, self.error = loader, good, error

    def __next__(self):
        if self.good == 0:
            raise self.error
        self.good -= 1
        return next(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()


def test_prefetched_steps_are_the_loaders_batches_and_state_is_the_consumed_position(tiny_cfg):
    grad_accum, n = 2, 5
    plain = build_loader(tiny_cfg)
    want = [[batch_digest(next(plain)) for _ in range(grad_accum)] for _ in range(n)]
    with StepPrefetcher(build_loader(tiny_cfg), grad_accum, depth=3) as steps:
        for k in range(n):
            assert [batch_digest(b) for b in next(steps)] == want[k]
            if k == 1:
                wait_until(steps._queue.full)  # the thread is now 3 steps (and one in hand) ahead of the loop
                resumed = build_loader(tiny_cfg)
                resumed.load_state_dict(steps.state_dict())  # what a checkpoint after step 2 holds
                assert [batch_digest(next(resumed)) for _ in range(grad_accum)] == want[2]
    assert not prefetch_threads()


def test_prefetch_on_and_off_give_bitwise_equal_losses_and_the_thread_ends(tiny_cfg):
    small(tiny_cfg)
    tiny_cfg.train.steps, tiny_cfg.train.grad_accum = 3, 2
    tiny_cfg.data.prefetch = 0
    off = train(tiny_cfg)
    tiny_cfg.data.prefetch = 2
    on = train(tiny_cfg)
    assert not prefetch_threads()
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm", "tokens_seen", "model_flops"):
        assert [m[key] for m in on] == [m[key] for m in off], key


def test_a_loader_error_in_the_thread_is_raised_in_the_caller(tiny_cfg):
    error = ValueError("shard 7 is unreadable")
    with StepPrefetcher(FailingLoader(build_loader(tiny_cfg), 3, error), 2, depth=2) as steps:
        next(steps)  # micro-batches 1, 2
        with pytest.raises(ValueError) as raised:
            next(steps)  # 3, then the error
        assert raised.value is error
        assert not prefetch_threads()  # the thread ended with the error
        with pytest.raises(ValueError):
            next(steps)  # and stays failed


def test_a_stream_config_error_stays_a_one_line_config_error(monkeypatch, capsys, tmp_path):
    import trainer.train as train_mod

    real = train_mod.build_loader
    monkeypatch.setattr(train_mod, "build_loader", lambda *a, **k: FailingLoader(
        real(*a, **k), 0, ConfigError("data stream 'x' holds latents of shape [4, 4, 4]")))
    code = main(["--config", str(REPO / "configs" / "tiny.yaml"), "data.source=synthetic", "logging.wandb=disabled",
                 "train.device=cpu", "model.n_layers=1", f"train.output_dir={tmp_path}", "data.prefetch=2"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: data stream 'x' holds latents of shape [4, 4, 4]"]
    assert not prefetch_threads()


def test_close_stops_a_thread_waiting_on_a_full_queue_and_exit_does_not_wait(tiny_cfg):
    steps = StepPrefetcher(build_loader(tiny_cfg), 1, depth=1)
    next(steps)
    wait_until(steps._queue.full)  # the thread is blocked putting the next step
    t0 = time.perf_counter()
    steps.close()
    assert not prefetch_threads() and time.perf_counter() - t0 < 5, time.perf_counter() - t0
    # Never closed, the thread blocked on its full queue: the interpreter still exits at once.
    code = ("import sys; from tests.test_prefetch import hold_open; hold_open()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def hold_open() -> None:
    """(In a fresh process.) A prefetcher left running with a full queue at interpreter exit."""
    from config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.source=synthetic", "logging.wandb=disabled"])
    steps = StepPrefetcher(build_loader(cfg), 1, depth=1)
    next(steps)
    wait_until(steps._queue.full)
    assert prefetch_threads()


def test_a_negative_prefetch_is_a_config_error(tmp_path):
    from config import load_config

    with pytest.raises(ConfigError, match="data.prefetch must be >= 0"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.source=synthetic", "data.prefetch=-1"])
