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
        f"train.seq_len={seq_len}", *overrides])


def save_checkpoint(out: Path, step: int, cfg: Any, state: dict[str, Any]) -> Path:
    """`state` saved as the trainer lays out step `step` under `out`: DCP + train_state.pt with the config."""
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    dcp.save(state, checkpoint_id=str(ckpt))
    torch.save({"step": step, "config": cfg.to_dict()}, ckpt / "train_state.pt")
    return ckpt


def train_and_checkpoint(cfg: Any, out: Path, steps: int) -> tuple[Any, Iterator, Path]:
    """(trainer, loader, checkpoint) after `steps` steps; DCP holds get_state_dict's {"model", "optim"}."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer.data import build_loader
    from trainer.train import Trainer

    trainer, loader = Trainer(cfg), build_loader(cfg)
    for _ in range(steps):
        trainer.train_step([next(loader)])
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    return trainer, loader, save_checkpoint(out, steps, cfg, {"model": model_sd, "optim": optim_sd})


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
