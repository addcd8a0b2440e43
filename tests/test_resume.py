"""Checkpoints: exact resume after SIGKILL, SIGUSR1 -> save + requeue exit (also when it arrives
during start-up), SIGTERM -> save + stop, skipped non-finite
steps, half-written checkpoints never loaded, unsafe config changes refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import ConfigError
from tests.conftest import REPO
from tests.helpers import checkpoint_manager
from trainer.checkpoint import checkpoint_dirs, resolve_resume
from trainer.preemption import REQUEUE_EXIT_CODE, STOP_EXIT_CODE, TrainingDiverged
from trainer.train import make_engine, train

SMALL = ["model.n_layers=2", "train.batch_size=2", "train.seq_len=128", "model.max_seq_len=128",
         "logging.wandb=disabled", "logging.log_every=1", "data.source=synthetic", "train.device=cpu",
         "optim.warmup_steps=2", "eval.every=0"]


def launch(out, *extra):
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           *SMALL, f"train.output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def losses_by_step(out, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}  # a replayed step keeps its last value


def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path):
    """With held-out evaluation on: it must not disturb the resumed run, and its numbers resume too."""
    steps = ["train.steps=24", "checkpoint.interval=3", "eval.every=5", "eval.rows=8"]
    ref = launch(tmp_path / "ref", *steps)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    run = tmp_path / "run"
    first = launch(run, *steps)
    while not checkpoint_dirs(run / "checkpoints") and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    resumed_at = int(checkpoint_dirs(run / "checkpoints")[-1].name.split("_")[1])
    assert resumed_at < 24, "the first run finished before it was killed; nothing was resumed"
    second = launch(run, *steps)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    assert f"resuming at step {resumed_at}" in out
    want, got = losses_by_step(tmp_path / "ref"), losses_by_step(run)
    assert sorted(got) == list(range(1, 25))
    assert got == want  # bitwise: same floats for every step
    for key in ("eval/lm_loss", "eval/diffusion_loss"):
        evals = losses_by_step(run, key)
        assert sorted(evals) == [5, 10, 15, 20, 24] and evals == losses_by_step(tmp_path / "ref", key)


def signal_in_loop(out, sig: signal.Signals, exit_code: int, *extra: str) -> tuple[str, int]:
    """Send `sig` once the run is in its loop; (its stdout, the step it saved as its only checkpoint)."""
    proc = launch(out, "train.steps=100000", "checkpoint.interval=0", *extra)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == exit_code, err[-2000:]
    step = max(losses_by_step(out))
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == [f"step_{step:08d}"]
    return stdout, step


def test_sigusr1_saves_and_exits_for_requeue_and_wandb_run_continues(tmp_path):
    out, step = signal_in_loop(tmp_path, signal.SIGUSR1, REQUEUE_EXIT_CODE, "logging.wandb=offline")
    assert "preemption signal" in out
    run_id = torch.load(checkpoint_dirs(tmp_path / "checkpoints")[0] / "train_state.pt", weights_only=True)["wandb_id"]
    again = launch(tmp_path, f"train.steps={step + 2}", "logging.wandb=offline")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert f"resuming at step {step}" in out and max(losses_by_step(tmp_path)) == step + 2
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one wandb run, resumed


def test_sigterm_saves_and_stops_without_requeue(tmp_path):
    """scancel sends TERM: save the step, but leave no REQUEUE marker (cancel means cancel)."""
    out, step = signal_in_loop(tmp_path, signal.SIGTERM, STOP_EXIT_CODE)
    assert f"stop signal (SIGTERM): saved step {step}" in out and "without requeue" in out
    assert not (tmp_path / "REQUEUE").exists()


def sig_caught(pid: int, sig: signal.Signals) -> bool:
    fields = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return bool(int(fields["SigCgt"], 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("how", ["trainer", "launcher"])
def test_a_usr1_during_start_up_is_honoured(tmp_path, how):
    """trainer: USR1 while the trainer still imports torch (its handler is the first thing it installs);
    launcher: USR1 to the node launcher before any trainer existed (slurm/launch_node.sh writes it down).
    Either way the run trains one step, saves it and exits for requeue; started with USR1 ignored, as
    under slurm/launch_node.sh, a lost signal would leave it training all 20 steps."""
    signal_file = tmp_path / "signals"
    if how == "launcher":
        signal_file.write_text("USR1\n")
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           *SMALL, f"train.output_dir={tmp_path}", "train.steps=20", "checkpoint.interval=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFUSION_SIGNAL_FILE": str(signal_file)}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    if how == "trainer":
        while not sig_caught(proc.pid, signal.SIGUSR1) and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    assert "SIGUSR1 arrived during start-up" in out, out
    assert (tmp_path / "REQUEUE").read_text() == "1\n" and max(losses_by_step(tmp_path)) == 1


def test_kill_during_async_save_leaves_previous_checkpoint_usable(tmp_path):
    proc = launch(tmp_path, "train.steps=100000", "checkpoint.interval=1", "checkpoint.async_save=true",
                  "checkpoint.keep_last=2")
    root = tmp_path / "checkpoints"
    while proc.poll() is None and not (checkpoint_dirs(root) and list(root.glob(".tmp_step_*"))):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    latest = resolve_resume("auto", root)
    assert latest is not None and latest.name.startswith("step_")
    step = int(latest.name.split("_")[1])
    again = launch(tmp_path, f"train.steps={step + 1}", "checkpoint.async_save=true")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert f"resuming at step {step}" in out


def test_half_written_checkpoint_is_never_loaded(tiny_cfg, tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint_manager(tiny_cfg, make_engine(tiny_cfg), root, keep_last=2)[0].save(3)
    (root / ".tmp_step_00000006").mkdir()  # a save that crashed half way
    (root / ".tmp_step_00000006" / "train_state.pt").write_bytes(b"partial")
    assert resolve_resume("auto", root) == root / "step_00000003"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(root / ".tmp_step_00000006"), root)


def test_async_save_commits_and_keeps_last_k_plus_every_m(tiny_cfg, tmp_path):
    root = tmp_path / "checkpoints"
    engine = make_engine(tiny_cfg)
    ckpt, state = checkpoint_manager(tiny_cfg, engine, root, keep_last=2, keep_every=4, async_save=True)
    for step in range(1, 7):
        state.step = step
        ckpt.save(step)
    ckpt.wait()
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000004", "step_00000005", "step_00000006"]
    reader, state = checkpoint_manager(tiny_cfg, engine, root)
    reader.load(root / "step_00000006")
    assert state.step == 6


def test_unsafe_config_change_is_refused_with_the_fields(tiny_cfg, tmp_path):
    engine = make_engine(tiny_cfg)
    path = checkpoint_manager(tiny_cfg, engine, tmp_path, keep_last=1)[0].save(1)
    changed = tiny_cfg.to_dict()
    changed["model"]["d_model"] = 256
    changed["optim"]["lr"] = 1.0  # safe: allowed
    with pytest.raises(ConfigError, match=r"model.d_model: 128 -> 256") as e:
        checkpoint_manager(tiny_cfg, engine, tmp_path, config=changed)[0].load(path)
    assert "optim" not in str(e.value)


def poison_latents(monkeypatch) -> object:
    """Make trainer.train's loader yield batches with NaN latents; returns the poisoned builder."""
    import trainer.train as train_mod

    real = train_mod.build_loader

    def poisoned(*args, **kwargs):
        loader = real(*args, **kwargs)
        original = type(loader).__next__

        class Poisoned(type(loader)):
            def __next__(self):
                batch = original(self)
                batch.latents[:] = float("nan")
                return batch

        loader.__class__ = Poisoned
        return loader

    monkeypatch.setattr(train_mod, "build_loader", poisoned)
    return poisoned


def test_non_finite_steps_are_skipped_then_training_stops(tiny_cfg, monkeypatch):
    poisoned = poison_latents(monkeypatch)
    tiny_cfg.checkpoint.enabled = True
    tiny_cfg.checkpoint.max_bad_steps = 3
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps at step 0"):
        train(tiny_cfg)
    saved = checkpoint_dirs(tiny_cfg.output_dir / "checkpoints")
    assert [p.name for p in saved] == ["step_00000000"]
    engine = make_engine(tiny_cfg)
    before = [p.detach().clone() for p in engine.parts[0].parameters()]
    result = engine.train_step([poisoned(tiny_cfg).__next__()], 0)
    assert result.skipped and engine.scheduler.last_epoch == 0  # no optimizer/LR step was taken
    assert all(torch.equal(a, b) for a, b in zip(before, engine.parts[0].parameters()))


def test_a_preemption_during_skipped_steps_saves_and_requeues(tiny_cfg, monkeypatch):
    """The preemption check runs after every step, a skipped (non-finite) one included."""
    from trainer.preemption import Preempted, PreemptionWatcher

    poison_latents(monkeypatch)
    monkeypatch.setattr(PreemptionWatcher, "requested", lambda self: signal.SIGUSR1)
    tiny_cfg.checkpoint.enabled = True
    tiny_cfg.checkpoint.max_bad_steps = 5
    with pytest.raises(Preempted):
        train(tiny_cfg)
    [saved] = checkpoint_dirs(tiny_cfg.output_dir / "checkpoints")
    assert saved.name == "step_00000000"
    assert json.loads((saved / "manifest.json").read_text())["clean"] is False  # saved after a skipped step
    assert (tiny_cfg.output_dir / "REQUEUE").read_text() == "0\n"


def test_preempted_run_with_prefetch_resumes_bitwise_like_an_uninterrupted_run(tiny_cfg, monkeypatch, tmp_path):
    """With data.prefetch the thread is steps ahead when the checkpoint is taken: it must hold the
    consumed position, so the resumed run sees the same batches (and losses) as one without a stop."""
    from trainer.preemption import Preempted, PreemptionWatcher
    from trainer.prefetch import THREAD_NAME

    cfg = tiny_cfg
    cfg.model.n_layers, cfg.train.batch_size, cfg.train.seq_len, cfg.model.max_seq_len = 2, 2, 128, 128
    cfg.train.steps, cfg.train.grad_accum, cfg.data.prefetch = 6, 2, 0
    want = [(m["loss"], m["grad_norm"]) for m in train(cfg)]  # uninterrupted, no prefetch
    calls = iter(range(1, 1000))
    monkeypatch.setattr(PreemptionWatcher, "requested", lambda self: signal.SIGUSR1 if next(calls) == 3 else None)  # after step 3
    cfg.train.output_dir, cfg.data.prefetch = str(tmp_path / "resumed"), 3
    cfg.checkpoint.enabled, cfg.checkpoint.interval = True, 0
    with pytest.raises(Preempted):
        train(cfg)
    assert [p.name for p in checkpoint_dirs(cfg.output_dir / "checkpoints")] == ["step_00000003"]
    rest = train(cfg)
    assert not [t for t in __import__("threading").enumerate() if t.name == THREAD_NAME]
    got = [(m["loss"], m["grad_norm"]) for m in rest]
    assert len(got) == 3 and got == want[3:]  # bitwise
