"""Misconfigured layouts fail at start-up with one-line errors naming the mismatch.

In-process checks call what `trainer.train` calls at start-up (load_config's validation,
ParallelConfig.resolved, parallel.dims.init_distributed) and so see the same messages as a real
launch; one real `torchrun --nproc-per-node 2` shows the launch path end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_config
from parallel.dims import ParallelDims, init_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"  # model.n_heads=4, n_kv_heads=2, n_layers=4


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    return one_line(e.value)


def one_line(error: BaseException) -> str:
    msg = str(error)
    assert msg and "\n" not in msg, f"not a one-line error: {msg!r}"
    return msg


def test_world_size_differs_from_layout():
    """2 processes for a layout of 4: trainer.train resolves the dims against WORLD_SIZE first."""
    cfg = load_config(TINY, ["parallel.dp_shard=4", "data.source=synthetic"])
    with pytest.raises(ConfigError) as e:
        cfg.parallel.resolved(2)
    assert one_line(e.value) == "world size 2 != dp_replicate*dp_shard*tp*pp = 1*4*1*1"
    # dp_shard=-1 fills the world, but only if the other dims divide it.
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["parallel.dp_shard=-1", "parallel.dp_replicate=4", "data.source=synthetic"]).parallel.resolved(2)
    assert one_line(e.value) == "world size 2 is not divisible by dp_replicate*tp*pp=4"


def test_init_distributed_refuses_a_layout_of_another_size(monkeypatch):
    """The mesh builder checks again (callers that skip `resolved`), before any process group exists."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        init_distributed(ParallelDims(pp=1, dp_replicate=1, dp_shard=2, tp=2), device_type="cpu")
    assert one_line(e.value) == "launched 2 processes but the layout pp*dp_replicate*dp_shard*tp = 1*1*2*2 = 4"


def test_tp_must_divide_heads():
    assert config_error(["parallel.tp=3"]) == "parallel.tp=3 does not divide model.n_heads=4"
    # Query heads divide, KV heads (GQA) do not.
    assert config_error(["parallel.tp=4"]) == "parallel.tp=4 does not divide model.n_kv_heads=2"


def test_pp_beyond_layers():
    assert config_error(["parallel.pp=8", "train.grad_accum=8"]) == (
        "parallel.pp=8 x 1 stages per rank exceeds model.n_layers=4"
    )
    # Interleaved schedules put pp_virtual_stages stages on each rank.
    msg = config_error(["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "train.grad_accum=4"])
    assert msg == "parallel.pp=4 x 2 stages per rank exceeds model.n_layers=4"


@pytest.mark.parametrize("dims", [["parallel.tp=2"], ["parallel.pp=2", "train.grad_accum=2"]])
def test_deepspeed_refuses_tp_and_pp(dims):
    msg = config_error(["parallel.engine=deepspeed", *dims])
    assert msg.startswith("parallel.engine=deepspeed runs ZeRO data parallelism only")
    assert "set parallel.tp=1 and parallel.pp=1" in msg


@pytest.mark.parametrize("override, fragment", [
    ("parallel.dp_replicate=2", "parallel.dp_replicate > 1"),
    ("parallel.cpu_offload=true", "use parallel.deepspeed.offload_optimizer"),
    ("parallel.meta_init=true", "parallel.meta_init"),
])
def test_deepspeed_refuses_torch_engine_options(override, fragment):
    """Checked when the engine is built (start-up), before deepspeed is imported."""
    from parallel.deepspeed_engine import _check_layout

    cfg = load_config(TINY, ["parallel.engine=deepspeed", override, "data.source=synthetic"])
    with pytest.raises(ConfigError) as e:
        _check_layout(cfg)
    msg = one_line(e.value)
    assert msg.startswith("parallel.engine=deepspeed does not support") and fragment in msg


def test_deepspeed_config_json_must_exist(tmp_path):
    from parallel.deepspeed_engine import build_ds_config

    missing = tmp_path / "nope.json"
    cfg = load_config(TINY, ["parallel.engine=deepspeed", f"parallel.deepspeed.config_json={missing}",
                              "data.source=synthetic"])
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg)
    assert one_line(e.value) == f"parallel.deepspeed.config_json '{missing}' does not exist"


def test_torchrun_launch_fails_with_one_line_error():
    """A real 2-process launch with tp=3: every rank prints one line and exits with code 2.

    torchrun itself then exits 1 and names the first failed rank's exit code (2); the other rank
    may be stopped by torchrun (SIGTERM) before or after it prints.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "trainer.train",
         "--config", str(TINY), "parallel.tp=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors, proc.stderr
    assert set(errors) == {"config error: parallel.tp=3 does not divide model.n_heads=4"}
    assert "(exitcode: 2)" in proc.stderr, proc.stderr  # torchrun's report of the first failed rank
    assert 'trainer/train.py"' not in proc.stderr, "a rank printed a traceback"


def test_deepspeed_refuses_async_save():
    msg = config_error(["parallel.engine=deepspeed", "checkpoint.async_save=true"])
    assert msg.startswith("checkpoint.async_save overlaps DCP writes") and "checkpoint.async_save=false" in msg
