"""slurm/*.sh run for real under a fake SLURM that acts like slurmd (tests/fake_slurm.py): sbatch runs
a spool copy of the script in a fresh checkout (no logs/), 1 node x 2 CPU ranks train, a preemption
signal (to the node launcher, to the batch shell, or to every process of the job step) saves and
requeues, and the next job resumes without losing a step; a config error is one line;
encode_latents.sh runs its array and merge jobs and writes shards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import fake_slurm
from tests.conftest import REPO
from tests.parallel_worker import free_port

TINY = ("data.source=synthetic logging.wandb=disabled model.n_layers=2 train.seq_len=128 model.max_seq_len=128 "
        "train.batch_size=2 parallel.dp_shard=2 checkpoint.interval=0 logging.log_every=1 train.device=cpu")
CHECKOUT = ("slurm", "trainer", "model", "parallel", "kernels", "data_prep", "inference", "configs", "pyproject.toml")


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")  # dev extra
    proc = subprocess.run([shellcheck, *map(str, (REPO / "slurm").glob("*.sh"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@dataclass
class Cluster:
    """A fake one-node cluster and a fresh checkout (links to this one's code, no logs/ folder)."""

    root: Path
    env: dict[str, str]
    jobs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def checkout(self) -> Path:
        return self.root / "checkout"

    @property
    def state(self) -> Path:
        return self.root / "slurm-state"

    def sbatch(self, *args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        """`sbatch --wait ARGS` run in `cwd` (the checkout), stdout/stderr captured."""
        job = subprocess.Popen(["sbatch", "--wait", *args], cwd=cwd or self.checkout, env={**self.env, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.jobs.append(job)
        return job

    def train(self, extra: str, **env: str) -> subprocess.Popen:
        """Submit slurm/pretrain_7b.sh on one node with 2 CPUs per task and the tiny config."""
        return self.sbatch("--nodes=1", "--cpus-per-task=2", str(self.checkout / "slurm" / "pretrain_7b.sh"),
                           EXTRA_ARGS=f"{TINY} {extra}", MASTER_PORT=str(free_port()), **env)

    def pid_file(self, pattern: str, job: subprocess.Popen) -> int:
        """Wait for the fake to write the pid file matching `pattern` (a running job's batch or step pid)."""
        while not (found := sorted(self.state.glob(pattern))):
            assert job.poll() is None, job.communicate()[0][-3000:]
            time.sleep(0.05)
        return int(found[0].read_text())

    def srun_calls(self) -> list[dict]:
        log = self.state / "srun.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def scontrol_log(self) -> str:
        log = self.state / "scontrol.log"
        return log.read_text() if log.exists() else ""


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "checkout").mkdir()
    for name in CHECKOUT:
        (tmp_path / "checkout" / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(fake_slurm.install(tmp_path / "bin", tmp_path / "slurm-state"))
    env.update(GPUS_PER_NODE="2", CONFIG="configs/tiny.yaml", OUTPUT_DIR=str(tmp_path / "run"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    c = Cluster(tmp_path, env)
    yield c
    for job in c.jobs:  # a failed test leaves nothing running: the steps, then the batch sessions
        if job.poll() is None:
            for pid_file in c.state.glob("steps/*.pid"):
                fake_slurm.signal_step(int(pid_file.read_text()), signal.SIGKILL)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def job_log(cluster: Cluster, job_id: int, folder: Path | None = None) -> str:
    """The job's output file, where `#SBATCH --output=%x-%j.out` puts it: the submit folder."""
    return ((folder or cluster.checkout) / f"transfusion-7b-{job_id}.out").read_text()


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


def test_fake_sbatch_acts_like_slurmd(cluster, tmp_path):
    script = tmp_path / "probe.sh"
    script.write_text('#!/bin/bash\n#SBATCH --output=out/%x-%j.log\necho "$0|$PWD|$SLURM_SUBMIT_DIR|$SLURM_JOB_ID"\n')
    job = cluster.sbatch(str(script), cwd=tmp_path)
    assert job.wait() != 0 and not (tmp_path / "out").exists()  # no folder for the log: fails, no log at all
    (tmp_path / "out").mkdir()
    job = cluster.sbatch(str(script), cwd=tmp_path)
    assert job.wait() == 0
    ran_as, cwd, submit_dir, job_id = (tmp_path / "out" / "probe.sh-4243.log").read_text().strip().split("|")
    assert Path(ran_as) == cluster.state / "spool" / "job4243" / "slurm_script"
    assert cwd == submit_dir == str(tmp_path) and job_id == "4243"


def test_submitted_outside_the_checkout_fails_with_one_line(cluster, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = cluster.train("train.steps=1", cwd=elsewhere)
    job.communicate(timeout=60)
    assert job.returncode == 2
    log = job_log(cluster, 4242, elsewhere).splitlines()
    assert len(log) == 1 and log[0].startswith("pretrain_7b.sh: cannot find the repository"), log
    assert cluster.srun_calls() == []


def test_config_error_is_one_line(cluster, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = cluster.train("model.d_modle=3", cwd=elsewhere, REPO=str(cluster.checkout))  # REPO: found anyway
    job.communicate(timeout=120)
    assert job.returncode == 2
    assert job_log(cluster, 4242, elsewhere).splitlines() == [
        "config error: unknown config key 'model.d_modle' (did you mean 'd_model'?)"]
    assert cluster.srun_calls() == []  # checked once, before any node started


def test_a_config_error_on_every_rank_is_not_buried_under_torchrun(tmp_path):
    """What the pre-flight cannot see fails on the ranks: their lines, then one summary line."""
    cmd = [sys.executable, str(REPO / "slurm" / "elastic_run.py"), "--standalone", "--nproc-per-node=2",
           "-m", "trainer.train", "--config", "configs/tiny.yaml", "model.d_modle=3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, lines
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert 1 <= sum(line == "config error: unknown config key 'model.d_modle' (did you mean 'd_model'?)"
                    for line in lines) <= 2, lines
    rank = r"rank \d (exit code 2|killed by SIGTERM)"  # torchrun stops the other rank when one fails
    assert re.fullmatch(rf".*: training failed \({rank}(, {rank})?\); the trainers' own output above says why",
                        lines[-1]) and "exit code 2" in lines[-1], lines


@pytest.mark.parametrize("delivery", ["launcher", "batch", "step"])
def test_signal_saves_requeues_and_resumes(cluster, delivery):
    """launcher: the node launcher alone gets USR1; batch: the batch shell alone (--signal=B:USR1,
    scancel --batch); step: every process of the job step at once (--signal=USR1@600, as slurmd does)."""
    run = cluster.root / "run"
    job = cluster.train("train.steps=100000")
    leader = cluster.pid_file("steps/4242.0.pid", job)
    while not (run / "metrics.jsonl").exists():  # the trainers are in their loop
        assert job.poll() is None, job.communicate()[0][-3000:]
        time.sleep(0.1)
    if delivery == "launcher":
        os.kill(leader, signal.SIGUSR1)
    elif delivery == "batch":
        os.kill(cluster.pid_file("spool/job4242/batch.pid", job), signal.SIGUSR1)
    else:
        assert len(fake_slurm.step_processes(leader)) >= 4  # launcher, torchrun agent, 2 trainers
        fake_slurm.signal_step(leader, signal.SIGUSR1)
    job.communicate(timeout=300)
    log = job_log(cluster, 4242)
    assert job.returncode == 0, log[-3000:]
    assert "requeue 4242" in cluster.scontrol_log()
    assert "requeueing job 4242" in log, log[-3000:]
    assert not any(word in log for word in ("Traceback", "FAILED", "training failed")), log[-3000:]  # not a crash
    step = int((run / "REQUEUE").read_text())
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert cluster.srun_calls()[0]["options"]["cpus-per-task"] == "2"
    if delivery == "batch":
        return  # the resume is the same as after the other two
    again = cluster.train(f"train.steps={step + 2}")  # the requeued job
    again.communicate(timeout=300)
    log = job_log(cluster, 4243)
    assert again.returncode == 0, log[-3000:]
    assert f"resuming at step {step}" in log and not (run / "REQUEUE").exists()
    assert metric_steps(run) == list(range(1, step + 3))  # contiguous: no step lost or repeated


def test_encode_latents_array_and_merge_jobs_write_shards(cluster, tmp_path):
    from streaming import LocalDataset

    from examples.tiny_assets import make_tiny_tokenizer, make_tiny_vae
    from tests.helpers import write_mixed_set

    work = tmp_path / "work"  # run outside the checkout, with relative paths
    mixed = write_mixed_set(work / "in")
    tok = make_tiny_tokenizer(work / "tok" / "tiny")
    vae = make_tiny_vae(work / "vae", resolution=16)
    cmd = ["bash", str(cluster.checkout / "slurm" / "encode_latents.sh"), "2", "shards", "--",
           "--input", "in/manifest.jsonl", "--vae", os.path.relpath(vae, work), "--tokenizer",
           os.path.relpath(tok, work), "--resolution", "16", "--min-size", "8", "--batch-size", "4",
           "--chunk-size", "5"]
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=work, env={**env, "CPUS": "1", "GPUS": "0"}, capture_output=True, text=True,
                          timeout=300)
    logs = work / "shards" / "logs"
    assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in logs.glob("*.log"))[-3000:]
    assert proc.stdout.strip().startswith("submitted array job 4242 (0-1) and merge job 4244")
    assert sorted(p.name for p in logs.iterdir()) == ["encode_4242_0.log", "encode_4242_1.log", "merge_4244.log"]
    assert sorted(p.name for p in (work / "shards").glob("part-*")) == ["part-00000", "part-00001"]
    ds = LocalDataset(str(work / "shards"))
    assert len(ds) == len(mixed["good"])
    assert json.loads((work / "shards" / "report.json").read_text())["complete"]
