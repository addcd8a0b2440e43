"""Configs: every YAML loads and validates; bad keys and values give one-line, actionable errors."""

import subprocess
import sys

import pytest

from model.config_base import ConfigError
from trainer.config import load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_paper_shapes_and_recipe():
    expected = {"160m": (16, 768, 12), "760m": (24, 1536, 24), "1.4b": (24, 2048, 16), "7b": (32, 4096, 32)}
    for name, (layers, width, heads) in expected.items():
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (layers, width, heads)
        o = cfg.optim
        assert (o.lr, o.min_lr, o.warmup_steps, o.weight_decay, o.grad_clip) == (3e-4, 1.5e-5, 4000, 0.1, 1.0)
        assert o.betas == [0.9, 0.95] and cfg.diffusion.loss_weight == 5.0
        assert cfg.train.seq_len == 4096 and cfg.diffusion.num_timesteps == 1000


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["optim.lr=1e-3", "model.n_kv_heads=null", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 1e-3 and cfg.model.n_kv_heads is None and cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=64", "unknown config key 'model.d_modle' (did you mean 'd_model'?)"),
        ("optimm.lr=1", "unknown config key 'optimm' (did you mean 'optim'?)"),
        ("model.n_heads=5", "model.n_heads=5 does not divide model.d_model=128"),
        ("optim.lr=-0.1", "optim.lr must be positive, got -0.1"),
        ("model.n_layers=two", "model.n_layers: expected an integer, got 'two'"),
        ("model.patch_codec=conv", "model.patch_codec: 'conv' is not one of 'linear', 'unet'"),
        ("parallel.tp=3", "parallel.tp=3 does not divide model.n_heads=4"),
        ("train.seq_len=1024", "train.seq_len=1024 exceeds model.max_seq_len=256"),
        ("model.tokens.boi=9999", "model.tokens.boi=9999 is outside the vocabulary [0, 2000)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unet_levels_must_match_patch():
    with pytest.raises(ConfigError, match="U-Net patch side is 4, but model.patch_size=2"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.patch_codec=unet", "model.unet_channels=[8,16,32]"])


def test_parallel_world_size_resolution():
    cfg = load_config(REPO / "configs" / "7b.yaml", ["parallel.tp=2"])
    assert cfg.parallel.resolved(16).dp_shard == 8
    with pytest.raises(ConfigError, match="world size 6 is not divisible by dp_replicate\\*tp\\*pp=4"):
        load_config(REPO / "configs" / "7b.yaml", ["parallel.tp=2", "parallel.pp=2"]).parallel.resolved(6)


def test_cli_reports_bad_config_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"), "model.d_modle=64"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: unknown config key 'model.d_modle' (did you mean 'd_model'?)"
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
