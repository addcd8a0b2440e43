"""The model trains with the Triton span kernel (interpreted on CPU; compiled on the GPU with
TRANSFUSION_TEST_DEVICE=cuda, tests/conftest.py) exactly like with SDPA."""

import pytest
import torch

from trainer.data import build_loader
from tests.conftest import TEST_DEVICE
from trainer.train import make_engine


@pytest.mark.parametrize("codec", ["linear"])
def test_triton_backend_trains_like_sdpa(tiny_cfg, codec):
    cfg = tiny_cfg
    cfg.model.patch_codec = codec
    cfg.model.n_layers = 2
    cfg.train.seq_len = cfg.model.max_seq_len = 64
    cfg.train.batch_size = 2
    cfg.train.device = TEST_DEVICE
    loader = build_loader(cfg)
    batches = [next(loader) for _ in range(3)]
    losses = {}
    for backend in ("sdpa", "triton"):
        cfg.model.attention = backend
        engine = make_engine(cfg)
        losses[backend] = [engine.train_step([b], step) for step, b in enumerate(batches)]
    for ref, got in zip(losses["sdpa"], losses["triton"]):
        assert got.lm_loss == pytest.approx(ref.lm_loss, rel=1e-5)
        assert got.diffusion_loss == pytest.approx(ref.diffusion_loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4)
    assert torch.isfinite(torch.tensor(losses["triton"][-1].loss))
