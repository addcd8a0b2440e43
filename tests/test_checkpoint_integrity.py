"""Checkpoint integrity and trust: pickle-free state files, manifests verified on resume and
conversion, damaged checkpoints skipped loudly (or refused in one line), never a NaN checkpoint,
retention that keeps the last clean one, and no secret in anything a run writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from config import ConfigError
from inference.convert import convert_checkpoint
from inference.loading import InferenceFolderError
from parallel.engine import TrainingEngine
from tests.conftest import REPO
from tests.helpers import checkpoint_manager
from trainer.checkpoint import checkpoint_dirs, resolve_resume
from trainer.checkpoint_files import MANIFEST, digest_share, list_files, verify_folder, write_manifest
from trainer.preemption import TrainingDiverged
from trainer.train import main, make_engine, train

PACKAGES = ("config", "model", "kernels", "parallel", "trainer", "data_prep", "inference", "examples")


def run_to(cfg, steps: int, interval: int = 2, keep_last: int = 5) -> list[Path]:
    cfg.train.steps, cfg.checkpoint.enabled = steps, True
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = interval, keep_last
    train(cfg)
    return checkpoint_dirs(cfg.output_dir / "checkpoints")


def reseal(folder: Path) -> None:
    """Rewrite a folder's manifest after tampering: what an attacker (or a buggy tool) could do."""
    write_manifest(folder, digest_share(folder, list_files(folder), 0, 1), step=0, clean=True)


def test_state_files_load_without_pickle_and_the_manifest_covers_every_file(tiny_cfg):
    step = run_to(tiny_cfg, 2)[-1]
    for f in step.glob("*.pt"):
        torch.load(f, weights_only=True)  # raises on any pickled object
    manifest = json.loads((step / MANIFEST).read_text())
    assert sorted(manifest["files"]) == list_files(step) and manifest["clean"] is True
    assert {".metadata", "train_state.pt", "rank_00000.pt"} <= set(manifest["files"])
    verify_folder(step)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["train_state.pt", "rank_00000.pt"])
def test_crafted_state_file_is_refused_by_resume_and_convert_and_never_runs(tiny_cfg, tmp_path, victim, capsys):
    step = run_to(tiny_cfg, 2)[-1]
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "evil": _Payload(marker)}, step / victim)
    reseal(step)
    with pytest.raises(ConfigError, match="holds pickled Python objects .*posix.system"):
        train(tiny_cfg)
    if victim == "train_state.pt":
        with pytest.raises(InferenceFolderError, match="holds pickled Python objects"):
            convert_checkpoint(step, tmp_path / "converted")
    else:
        convert_checkpoint(step, tmp_path / "converted")  # reads only train_state.pt and the DCP shards
    cfg = f"train.output_dir={tiny_cfg.output_dir}"
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), cfg, "data.source=synthetic",
                 "logging.wandb=disabled", "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error:") and "pre-release checkpoint format" in err[0]
    assert not marker.exists()


def _flip(path: Path, offset: int = 64, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    end = min(len(data), offset + n)
    data[offset:end] = bytes(b ^ 0xFF for b in data[offset:end])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_shard_fall_back_loudly_to_the_previous_step(tiny_cfg, capsys):
    ckpts = run_to(tiny_cfg, 4)
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    shard = next(ckpts[-1].glob("*.distcp"))
    _flip(shard)
    with pytest.raises(ConfigError, match=rf"{shard.name} does not match.*previous checkpoint there is step_00000002"):
        resolve_resume(str(ckpts[-1]), tiny_cfg.output_dir / "checkpoints")  # a named step: no fallback
    with pytest.raises(InferenceFolderError, match=rf"damaged: {shard.name} does not match its SHA-256"):
        convert_checkpoint(ckpts[-1], tiny_cfg.output_dir / "converted")
    capsys.readouterr()
    tiny_cfg.train.steps = 5
    train(tiny_cfg)
    out, err = capsys.readouterr()
    assert f"{shard.name} does not match its SHA-256" in err and "skipping it" in err
    assert "resuming from" in err and "(step 2)" in err and "step_00000004" in err
    assert "resuming at step 2" in out


@pytest.mark.parametrize("damage", ["truncate .metadata", "truncate train_state.pt", "truncate rank_00000.pt",
                                    "delete .metadata"])
def test_damaged_only_checkpoint_stops_the_run_instead_of_restarting(tiny_cfg, damage):
    step = run_to(tiny_cfg, 2)[-1]
    how, name = damage.split()
    path = step / name
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    tiny_cfg.train.steps = 3
    with pytest.raises(ConfigError, match=rf"none of the 1 checkpoints .*{re.escape(name)} (is missing|has \d+ bytes)"
                       r".*does not restart from scratch"):
        train(tiny_cfg)
    assert json.loads(tiny_cfg.output_dir.joinpath("metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_nan_weights_are_never_saved_and_the_last_good_checkpoint_survives(tiny_cfg, monkeypatch):
    real_step = TrainingEngine.train_step

    def corrupt_after_step_4(self, batches, step):
        if step == 4:
            with torch.no_grad():
                next(self.parts[0].parameters()).fill_(float("nan"))  # every token's embedding
        return real_step(self, batches, step)

    monkeypatch.setattr(TrainingEngine, "train_step", corrupt_after_step_4)
    tiny_cfg.checkpoint.max_bad_steps = 2
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite steps at step 4; .*NaN/Inf at step 4: "
                                               r"not saved.*last good checkpoint is .*step_00000004"):
        run_to(tiny_cfg, 10, keep_last=1)
    [kept] = checkpoint_dirs(tiny_cfg.output_dir / "checkpoints")
    assert kept.name == "step_00000004"
    engine = make_engine(tiny_cfg)
    verify_folder(kept)
    checkpoint_manager(tiny_cfg, engine, kept.parent)[0].load(kept)
    assert all(torch.isfinite(p).all() for p in engine.parts[0].parameters())


def test_a_verified_checkpoint_holding_nan_is_skipped_at_load(tiny_cfg, capsys):
    ckpts = run_to(tiny_cfg, 4)
    newest = ckpts[-1]
    engine = make_engine(tiny_cfg)
    checkpoint_manager(tiny_cfg, engine, newest.parent)[0].load(newest)
    with torch.no_grad():
        next(engine.parts[0].parameters()).view(-1)[0] = float("nan")
    model_sd, optim_sd = get_state_dict(engine.parts[0], engine.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(newest))  # written around our checks
    reseal(newest)
    tiny_cfg.train.steps = 5
    train(tiny_cfg)
    out, err = capsys.readouterr()
    assert "hold NaN/Inf; skipping it" in err and "resuming at step 2" in out


def test_retention_keeps_the_newest_clean_checkpoint(tiny_cfg, tmp_path):
    ckpt, _ = checkpoint_manager(tiny_cfg, make_engine(tiny_cfg), tmp_path, keep_last=1)
    for step, bad in [(2, 0), (3, 2), (4, 3), (5, 0)]:
        ckpt.save(step, clean=bad == 0)
        names = [p.name for p in checkpoint_dirs(tmp_path)]
        assert names == (["step_00000002", f"step_{step:08d}"] if bad else [f"step_{step:08d}"]), names


def test_resume_from_outside_the_run_warns_once_that_checkpoints_are_trusted_only(tiny_cfg, tmp_path, capsys):
    source = run_to(tiny_cfg, 2)[-1]
    tiny_cfg.train.output_dir = str(tmp_path / "other")
    tiny_cfg.checkpoint.resume = str(source)
    tiny_cfg.train.steps = 3
    train(tiny_cfg)
    err = capsys.readouterr().err
    assert err.count("trusted-only") == 1 and str(source) in err


def test_secrets_are_never_written(tmp_path):
    sentinel = "sentinel-9f3c2a7e41b0d5"
    env = {**os.environ, "WANDB_API_KEY": sentinel, "MY_SERVICE_TOKEN": sentinel + "-2", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
         "data.source=synthetic", "train.steps=2", "checkpoint.interval=1", "logging.wandb=offline",
         f"train.output_dir={out}", f"logging.run_name=run-{sentinel}-2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sentinel not in proc.stdout + proc.stderr
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and sentinel.encode() in p.read_bytes()]
    assert not leaks and any(out.rglob("*.wandb")), leaks


def test_package_sources_hold_no_unsafe_loads():
    patterns = {
        "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
        "pickle.load": re.compile(r"\bpickle\.loads?\("),
        "yaml.load without a safe loader": re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"),
        "shell=True": re.compile(r"shell\s*=\s*True"),
    }
    found = [f"{path.relative_to(REPO)}:{i}: {what}"
             for pkg in PACKAGES for path in sorted((REPO / pkg).rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             for what, rx in patterns.items() if rx.search(line)]
    assert not found, found


def test_an_unfinished_save_is_removed_at_start_up_and_the_run_resumes(tiny_cfg, capsys):
    """A `.tmp_step_N` left by a save killed mid-write is deleted (and logged) when the next run starts."""
    run_to(tiny_cfg, 2)
    root = tiny_cfg.output_dir / "checkpoints"
    leftover = root / ".tmp_step_00000007"  # a later step this run never saves again
    leftover.mkdir()
    (leftover / "rank_00000.pt").write_bytes(b"\0" * 1000)
    capsys.readouterr()
    tiny_cfg.train.steps = 3
    train(tiny_cfg)
    out, err = capsys.readouterr()
    assert not leftover.exists() and f"removed {leftover}" in err and "resuming at step 2" in out
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000002", "step_00000003"]
