"""`sbatch slurm/pretrain_7b.sh` run for real under fake srun/scontrol/sbatch: 1 node x 2 CPU ranks
train, save on the preemption signal, requeue, and the next invocation resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.parallel_worker import free_port

FAKES = {
    # srun: drop its options, run the command once (one node).
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/usr/bin/env bash\nif [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else echo "$@" >> "$FAKE_SLURM_LOG"; fi\n',
    "sbatch": '#!/usr/bin/env bash\nexec bash "$@"\n',
}
TINY = ("data.source=synthetic logging.wandb=disabled model.n_layers=2 train.seq_len=128 model.max_seq_len=128 "
        "train.batch_size=2 parallel.dp_shard=2 checkpoint.interval=0 logging.log_every=1 train.device=cpu")


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")  # dev extra
    proc = subprocess.run([shellcheck, *map(str, (REPO / "slurm").glob("*.sh"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def fake_slurm(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in FAKES.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    env = {
        **os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node001",
        "GPUS_PER_NODE": "2", "CONFIG": "configs/tiny.yaml", "OUTPUT_DIR": str(tmp_path / "run"),
        "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
    }
    return env, tmp_path


def sbatch(env, extra, port):
    return subprocess.Popen(
        ["sbatch", str(REPO / "slurm" / "pretrain_7b.sh")], cwd=REPO, start_new_session=True,
        env={**env, "EXTRA_ARGS": f"{TINY} {extra}", "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_sbatch_trains_requeues_on_signal_and_resumes(fake_slurm):
    env, tmp = fake_slurm
    run = tmp / "run"
    job = sbatch(env, "train.steps=100000", free_port())
    while not (run / "metrics.jsonl").exists() and job.poll() is None:
        time.sleep(0.2)
    # SLURM's --signal=USR1@600 reaches the job step's task: the node launcher.
    subprocess.run(["pkill", "-USR1", "-f", "slurm/launch_node.sh"], check=False)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert "requeue 4242" in (tmp / "slurm.log").read_text()
    step = int((run / "REQUEUE").read_text())
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    again = sbatch(env, f"train.steps={step + 2}", free_port())
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"resuming at step {step}" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [step + 1, step + 2] and not (run / "REQUEUE").exists()
