"""Configs: every YAML loads and validates; bad keys and values give one-line, actionable errors;
paper-scale configs train on real shards found through ${DATA_ROOT}."""

import os
import subprocess
import sys

import pytest
import yaml

from config import ConfigError, load_config
from tests.conftest import REPO
from tests.helpers import write_shards

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER = ["160m", "760m", "1.4b", "7b"]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """A tiny real shard set laid out like DATA_ROOT: images/ and text/ and their held-out split heldout/."""
    root = tmp_path_factory.mktemp("data_root")
    write_shards(root, n_images=4, n_texts=4)
    write_shards(root / "heldout", n_images=2, n_texts=2, seed=1)
    return root


@pytest.fixture
def data_root(shard_root, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(shard_root))
    return shard_root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path, data_root, tmp_path, monkeypatch):
    # tiny.yaml reads the embedded default's shards relative to the working directory.
    shards = tmp_path / "outputs" / "embedded_default" / "shards"
    shards.mkdir(parents=True)
    for kind in ("images", "text", "heldout"):
        (shards / kind).symlink_to(data_root / kind)
    # edit_tiny.yaml: the edit shards and the demo checkpoint it starts from (loading checks they exist)
    (tmp_path / "outputs" / "edit_tiny" / "shards").mkdir(parents=True)
    (tmp_path / "outputs" / "edit_tiny" / "shards" / "edit").symlink_to(data_root / "images")
    (tmp_path / "outputs" / "tiny" / "checkpoints" / "step_00006000").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0
    assert cfg.data.source == "streaming"
    if path.stem in PAPER:
        assert [s.path for s in cfg.data.streams] == [f"{data_root}/images", f"{data_root}/text"]
    assert cfg.eval.enabled and [s.path.split("/")[-2:] for s in cfg.eval.streams] == [["heldout", "images"],
                                                                                       ["heldout", "text"]]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_name_real_shards_one_to_one(name):
    """As written (before any override): streaming shards under ${DATA_ROOT}, image:text 1:1 by tokens."""
    data = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["data"]
    assert data["source"] == "streaming"
    streams = {s["kind"]: s for s in data["streams"]}
    assert sorted(streams) == ["image", "text"] and len(data["streams"]) == 2
    assert streams["image"]["proportion"] == streams["text"]["proportion"]
    assert all(s["path"].startswith("${DATA_ROOT}/") for s in data["streams"])


def test_unset_data_root_is_one_line(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.chdir(REPO)  # the message names the config as the user wrote it
    with pytest.raises(ConfigError) as e:
        load_config("configs/7b.yaml")
    assert str(e.value) == (
        "configs/7b.yaml: data.streams[0].path uses ${DATA_ROOT}, which is not set; "
        "export DATA_ROOT=/path/to/shards (see slurm/pretrain_7b.sh)"
    )
    monkeypatch.setenv("DATA_ROOT", "")
    with pytest.raises(ConfigError, match=r"uses \$\{DATA_ROOT\}, which is empty; export DATA_ROOT="):
        load_config(REPO / "configs" / "7b.yaml")


def test_synthetic_stays_an_explicit_choice_without_data_root(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    cfg = load_config(REPO / "configs" / "7b.yaml", ["data.source=synthetic"])
    assert cfg.data.source == "synthetic"
    # An override that replaces the streams needs no variable either, once the held-out streams are
    # replaced too or evaluation is off.
    with pytest.raises(ConfigError, match="data.streams\\[0\\] \\(image stream\\) has no shards"):
        load_config(REPO / "configs" / "7b.yaml", ["data.streams=[{path: /nowhere/img, kind: image}]", "eval.every=0"])
    with pytest.raises(ConfigError, match=r"eval.streams\[0\].path uses \$\{DATA_ROOT\}, which is not set"):
        load_config(REPO / "configs" / "7b.yaml", ["data.streams=[{path: /nowhere/img, kind: image}]"])


def test_the_tiny_configs_missing_shards_name_the_embedded_default_command(tmp_path, monkeypatch):
    """tiny.yaml's shards come from examples.digits.prepare (data.prepare), not from the data_prep tools."""
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["eval.every=0"]):
        with pytest.raises(ConfigError) as e:
            load_config(REPO / "configs" / "tiny.yaml", extra)
        assert "`python -m examples.digits.prepare --out outputs/embedded_default`" in str(e.value)


def test_missing_shards_name_the_stream_path_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "7b.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.streams[0] (image stream) has no shards: {tmp_path}/images/index.json does not exist;")
    assert f"`python -m data_prep.encode_latents --input IMAGES --out {tmp_path}/images " in msg
    # Images present, text missing: the text stream and its own tool.
    write_shards(tmp_path, n_images=2, n_texts=2)
    (tmp_path / "text" / "index.json").unlink()
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "7b.yaml")
    assert str(e.value).startswith(f"data.streams[1] (text stream) has no shards: {tmp_path}/text/index.json")
    assert f"`python -m data_prep.tokenize_text --input CORPUS --out {tmp_path}/text " in str(e.value)
    # Workers' parts written but never merged: the merge command.
    (tmp_path / "text" / "part-00000").mkdir()
    with pytest.raises(ConfigError, match=f"merge the workers' parts with `python -m data_prep.merge_index {tmp_path}/text`"):
        load_config(REPO / "configs" / "7b.yaml")


def test_remote_streams_are_not_checked(tmp_path):
    cfg = load_config(REPO / "configs" / "7b.yaml", [
        f"data.streams=[{{path: {tmp_path / 'cache'}, remote: 's3://bucket/images', kind: image}}]", "eval.every=0"])
    assert cfg.data.streams[0].remote == "s3://bucket/images"


def test_train_refuses_missing_shards_before_building_the_model(tmp_path):
    """The real entry point on 7b.yaml: one line and exit code 2, in the time it takes to read a
    YAML (building a 7B model on this CPU would take minutes and tens of GB)."""
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/7b.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: data.streams[0] (image stream) has no shards: {tmp_path}/images/index.json does not "
        f"exist; prepare it with `python -m data_prep.encode_latents --input IMAGES --out {tmp_path}/images "
        "--vae VAE_DIR --tokenizer TOKENIZER.model`, or fix the path"
    ]
    assert proc.stdout == ""


def test_env_references_elsewhere(monkeypatch):
    monkeypatch.setenv("RUN_TAG", "abc")
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.source=synthetic", "train.output_dir=/runs/${RUN_TAG}/x"])
    assert cfg.train.output_dir == "/runs/abc/x"
    with pytest.raises(ConfigError, match=r"train.output_dir uses \$\{NOPE_UNSET\}, which is not set; export NOPE_UNSET="):
        load_config(REPO / "configs" / "tiny.yaml", ["data.source=synthetic", "train.output_dir=${NOPE_UNSET}"])
    with pytest.raises(ConfigError, match="is not a"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.source=synthetic", "train.output_dir=${1X}"])


def test_paper_shapes_and_recipe(data_root):
    expected = {"160m": (16, 768, 12), "760m": (24, 1536, 24), "1.4b": (24, 2048, 16), "7b": (32, 4096, 32)}
    for name, (layers, width, heads) in expected.items():
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (layers, width, heads)
        o = cfg.optim
        assert (o.lr, o.min_lr, o.warmup_steps, o.weight_decay, o.grad_clip) == (3e-4, 1.5e-5, 4000, 0.1, 1.0)
        assert o.betas == [0.9, 0.95] and cfg.diffusion.loss_weight == 5.0
        assert cfg.train.seq_len == 4096 and cfg.diffusion.num_timesteps == 1000


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["optim.lr=1e-3", "model.n_kv_heads=null", "optim.betas=[0.8,0.9]",
                                                      "data.source=synthetic"])
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
    cfg = load_config(REPO / "configs" / "7b.yaml", ["parallel.tp=2", "data.source=synthetic"])
    assert cfg.parallel.resolved(16).dp_shard == 8
    with pytest.raises(ConfigError, match="world size 6 is not divisible by dp_replicate\\*tp\\*pp=4"):
        load_config(REPO / "configs" / "7b.yaml", ["parallel.tp=2", "parallel.pp=2", "data.source=synthetic"]).parallel.resolved(6)


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
