"""Fixtures and builders shared by test modules; import them from here, not from other test modules.

`one_thread` is an autouse, module-scoped fixture: importing it into a test module applies it there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from examples.tiny_assets import caption, image_bytes
from tests.conftest import REPO


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tiny models' ops are far faster on one thread than split over two busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_run_config(out: Path, seq_len: int, *overrides: str) -> Any:
    """configs/tiny.yaml with wandb off, outputs in `out`, a `seq_len` context, then `overrides`."""
    from config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        "logging.wandb=disabled", f"train.output_dir={out}", f"model.max_seq_len={seq_len}",
        f"train.seq_len={seq_len}", "eval.every=0", *overrides])


def save_checkpoint(out: Path, step: int, cfg: Any, state: dict[str, Any]) -> Path:
    """`state` saved as the trainer lays out step `step` under `out`: DCP + train_state.pt with the config."""
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    dcp.save(state, checkpoint_id=str(ckpt))
    torch.save({"step": step, "config": cfg.to_dict()}, ckpt / "train_state.pt")
    return ckpt


def checkpoint_manager(cfg: Any, engine: Any, root: Path, config: dict | None = None, step: int = 0,
                       **checkpoint: Any) -> tuple[Any, Any]:
    """(CheckpointManager, its TrainState) over `engine` as train() registers them, with `checkpoint.*`
    overrides (e.g. keep_last=2) and optionally another config dict to compare on load."""
    import dataclasses

    from trainer.checkpoint import CheckpointManager
    from trainer.train_state import ScheduleState, TrainState

    state = TrainState(step=step)
    ck = dataclasses.replace(cfg.checkpoint, **checkpoint)
    manager = CheckpointManager(ck, root, engine, config or cfg.to_dict(), state,
                                {"scheduler": ScheduleState(engine.scheduler)})
    return manager, state


def train_and_checkpoint(cfg: Any, out: Path, steps: int) -> tuple[Any, Iterator, Path]:
    """(engine, loader, checkpoint) after `steps` steps; DCP holds get_state_dict's {"model", "optim"}."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer.data import build_loader
    from trainer.train import make_engine

    engine, loader = make_engine(cfg), build_loader(cfg)
    for step in range(steps):
        engine.train_step([next(loader)], step)
    model_sd, optim_sd = get_state_dict(engine.parts[0], engine.optimizer)
    return engine, loader, save_checkpoint(out, steps, cfg, {"model": model_sd, "optim": optim_sd})


# (name, mode, format, size) of the good images of the mixed set: every decode path once or more.
GOOD_KINDS = [("rgb_png", "RGB", "PNG", (24, 20)), ("rgb_jpg", "RGB", "JPEG", (40, 30)),
              ("gray", "L", "PNG", (20, 24)), ("cmyk", "CMYK", "JPEG", (32, 32)),
              ("rgba", "RGBA", "PNG", (20, 20)), ("palette", "P", "PNG", (22, 18)),
              ("gray16", "I;16", "PNG", (18, 18)), ("la", "LA", "PNG", (16, 20)), ("bmp", "RGB", "BMP", (30, 17))]


def write_mixed_set(root: str | Path, n_good: int = 18) -> dict:
    """Images + a JSONL manifest with good samples and one or more of every bad-input reason.

    Returns {"manifest": path, "good": [keys in manifest order], "bad": {reason: count}}.
    """
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    good: list[str] = []
    for i in range(n_good):
        name, mode, fmt, size = GOOD_KINDS[i % len(GOOD_KINDS)]
        path = f"img/good_{i:03d}_{name}.{fmt.lower()}"
        (root / path).write_bytes(image_bytes(i, size, mode, fmt))
        rows.append(json.dumps({"path": path, "caption": caption(i)}))
        good.append(path)
    jpg = image_bytes(999, (48, 40), "RGB", "JPEG")
    (root / "img/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = bytearray(image_bytes(998, (30, 30)))
    png[100:116] = bytes(16)  # zeroed compressed pixel data: "broken data stream"
    (root / "img/corrupt.png").write_bytes(bytes(png))
    (root / "img/garbage.jpg").write_bytes(b"this is text, not an image")
    (root / "img/tiny.png").write_bytes(image_bytes(5, (4, 6)))
    (root / "img/ok_for_caption_tests.png").write_bytes(image_bytes(6))
    rows += [
        json.dumps({"path": "img/truncated.jpg", "caption": "cut in half"}),
        json.dumps({"path": "img/corrupt.png", "caption": "broken"}),
        json.dumps({"path": "img/garbage.jpg", "caption": "garbage"}),
        json.dumps({"path": "img/tiny.png", "caption": "too small"}),
        json.dumps({"path": "img/does_not_exist.png", "caption": "missing file"}),
        json.dumps({"path": "img/ok_for_caption_tests.png", "caption": ""}),
        json.dumps({"path": "img/ok_for_caption_tests.png", "caption": "   "}),
        json.dumps({"path": "img/ok_for_caption_tests.png"}),
        '{"path": "img/broken_json.png", "caption": ',
    ]
    order = np.random.default_rng(1).permutation(len(rows))  # interleave good and bad
    rows = [rows[i] for i in order]
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    bad = {"truncated_image": 1, "corrupt_image": 2, "too_small": 1, "unreadable": 1,
           "empty_caption": 2, "missing_caption": 1, "bad_manifest_line": 1}
    good_in_order = [json.loads(rows[i])["path"] for i in range(len(rows))
                     if rows[i].endswith("}") and json.loads(rows[i])["path"] in good]
    return {"manifest": root / "manifest.jsonl", "good": good_in_order, "bad": bad}


# --- Shared by the inference tests (the session fixtures `run`, `spm_model`, `vae_dir` and `folder` live in
# tests/conftest.py) and by the streaming-data tests. ---

INFERENCE_SEQ = 64  # model.max_seq_len of the inference test model (an image takes 16 patches + BOI/EOI)


def inference_run_config(out: Path) -> Any:
    """The inference tests' tiny model: 2 steps of batch 2 on CPU, synthetic data, an INFERENCE_SEQ context."""
    return tiny_run_config(out, INFERENCE_SEQ, "train.batch_size=2", "train.steps=2", "train.device=cpu",
                           "data.source=synthetic")


SHARD_LATENT = (4, 8, 8)  # the latent shape of write_shards' images (tiny.yaml's)


def write_shards(root: Path, n_images: int = 60, n_texts: int = 80, seed: int = 0) -> None:
    """MDS shards under `root`: images/ (`n_images` captioned SHARD_LATENT latents) and text/ (`n_texts` documents)."""
    from streaming import MDSWriter

    from data_prep.schema import TEXT_COLUMNS, image_columns

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(root / "images"), columns=image_columns(SHARD_LATENT), size_limit=1 << 16) as w:
        for i in range(n_images):
            w.write({
                "key": f"img{i}", "caption": f"caption {i}",
                "caption_ids": rng.integers(10, 500, size=int(rng.integers(1, 12))).astype(np.int32),
                "latent_mean": rng.standard_normal(SHARD_LATENT).astype(np.float16),
                "latent_std": (0.1 * rng.random(SHARD_LATENT)).astype(np.float16),
                "orig_size": np.array([28, 28], dtype=np.int32),
            })
    with MDSWriter(out=str(root / "text"), columns=TEXT_COLUMNS, size_limit=1 << 16) as w:
        for i in range(n_texts):
            body = rng.integers(10, 500, size=int(rng.integers(5, 150)))
            w.write({"key": f"t{i}", "tokens": np.concatenate([[1], body, [2]]).astype(np.int32)})


def streaming_overrides(root: Path, *extra: str) -> list[str]:
    """Config overrides that train on write_shards' images/ and text/ under `root`, 1:1, then `extra`."""
    return [
        "data.source=streaming", "logging.wandb=disabled", "eval.every=0",
        f"data.streams=[{{path: {root / 'images'}, kind: image, proportion: 1}}, "
        f"{{path: {root / 'text'}, kind: text, proportion: 1}}]",
        *extra,
    ]


def batch_digest(batch: Any) -> str:
    """sha256 over a packed batch's tensors: equal digests, bit-identical batches."""
    import hashlib

    h = hashlib.sha256()
    for name in ("tokens", "kv_lo", "kv_hi", "text_targets", "latents", "image_slots", "image_max_t"):
        h.update(getattr(batch, name).contiguous().numpy().tobytes())
    return h.hexdigest()


def recorded_loaders(cfg: Any, world: int, taken: list) -> list:
    """One loader per rank of `world`; every sample a source reads is appended to `taken` as
    (stream, epoch, key)."""
    from trainer.data import build_loader

    loaders = [build_loader(cfg, rank, world) for rank in range(world)]
    for loader in loaders:
        src, read = loader.source, loader.source._next_sample

        def recording(i, read=read, src=src):
            sample, epoch, pos = read(i)
            taken.append((i, epoch, sample["key"]))
            return sample, epoch, pos

        src._next_sample = recording
    return loaders


def keys_of(taken: list, stream: int, epoch: int = 0) -> list[str]:
    """The keys `recorded_loaders` saw read from `stream` during `epoch`."""
    return [k for s, e, k in taken if s == stream and e == epoch]


# --- The scale planner's steps that tests/test_plan.py runs in a fresh process each (`python -c "import
# tests.helpers"`: one fake process group per process). ---


def plan_config(name: str, overrides: list[str], world: int) -> Any:
    """configs/`name` with the planner's defaults, then `overrides`, its parallel layout resolved for `world`."""
    from config import load_config
    from planner.plan import PLAN_DEFAULTS

    cfg = load_config(REPO / "configs" / name, PLAN_DEFAULTS + overrides)
    cfg.parallel = cfg.parallel.resolved(world)
    return cfg


def plan_fake_rank(name: str, overrides: list[str], world: int, rank: int = 0, attention: str = "plan") -> dict:
    """One rank's fake step, summarised."""
    from planner.plan import _rank_summary
    from planner.hardware import GPUS
    from planner.step import run_rank

    r = run_rank(plan_config(name, overrides, world), rank, GPUS["h100"], attention)
    summary = _rank_summary(r, GPUS["h100"])[0]
    summary["peak_bytes"], summary["ema_bytes"] = r.peak_bytes, r.peak_split["ema"]
    summary["clip_all_reduces"] = r.counter.calls_by_phase["clip"]
    return summary


def plan_real_step_peak(name: str, overrides: list[str]) -> dict:
    """Peak tensor memory of the trainer's real second step on CPU (MemTracker on real tensors)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainer.data import build_loader
    from trainer.train import make_engine

    cfg = plan_config(name, overrides, 1)
    cfg.model.attention = "sdpa"
    engine = make_engine(cfg)
    loader = build_loader(cfg, 0, 1)
    batches = [next(loader) for _ in range(cfg.train.grad_accum)]
    engine.train_step(batches, 0)  # creates the AdamW states, as in steady state
    mt = MemTracker()
    mt.track_external(engine.parts[0], engine.optimizer)
    with mt:
        engine.train_step(batches, 1)
    snap = mt.get_tracker_snapshot("peak")
    return {"peak_bytes": int(snap[torch.device("cpu")]["Total"])}
