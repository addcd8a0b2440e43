"""Shared fixtures. Triton kernels run on CPU through the interpreter, which must be enabled before
triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny config with wandb off and outputs in a temp folder."""
    from config import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        ["logging.wandb=disabled", f"train.output_dir={tmp_path / 'run'}", "checkpoint.enabled=false",
         "data.source=synthetic"],
    )
