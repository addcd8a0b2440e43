"""Fixtures and builders shared by test modules; import them from here, not from other test modules.

`one_thread` is an autouse, module-scoped fixture: importing it into a test module applies it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp

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
    from trainer.config import load_config

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
