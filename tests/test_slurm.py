"""slurm/*.sh under a real one-node SLURM (tests/real_slurm.py: slurmctld + slurmd + munge, started
here): the batch script runs from slurmd's spool copy, 1 node x 2 CPU ranks train; the timed USR1
saves, requeues and resumes bit-identically; scancel saves and cancels without a requeue; a USR1 during
start-up is kept; two jobs share a node; mistakes (config, checkout, time limit) are one line;
encode_latents.sh runs its array and merge jobs. Plus torchrun's own failures, without SLURM.

A requeued job waits ~2 min in SLURM (BeginTime) before it may start again; the tests start it at
once with `scontrol update StartTime=now`, which is the only thing they do that a cluster would not.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import real_slurm
from tests.conftest import REPO
from tests.parallel_worker import free_port

TINY = ("data.source=synthetic logging.wandb=disabled model.n_layers=2 train.seq_len=128 model.max_seq_len=128 "
        "train.batch_size=2 parallel.dp_shard=2 checkpoint.interval=0 logging.log_every=1 train.device=cpu "
        "optim.warmup_steps=2 optim.decay_steps=1000 eval.every=0")
CHECKOUT = ("slurm", "config", "configs", "trainer", "model", "parallel", "kernels", "data_prep", "inference", "planner",
            "examples", "pyproject.toml")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = real_slurm.unavailable()
    if reason:
        if os.environ.get("CI"):  # `make test` installs the packages where it can (Makefile: slurm-deps)
            pytest.fail(f"real SLURM needed in CI: {reason}")
        pytest.skip(reason)
    cluster = real_slurm.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    real_slurm.stop(cluster)


@pytest.fixture
def checkout(slurm, tmp_path):
    """A fresh checkout (links to this one's code, no logs/ folder), where jobs are submitted from;
    whatever the test left in the queue is cancelled after it."""
    (tmp_path / "checkout").mkdir()
    for name in CHECKOUT:
        (tmp_path / "checkout" / name).symlink_to(REPO / name)
    yield tmp_path / "checkout"
    slurm.run("scancel", "--full", "--user", "root", check=False)
    deadline = time.monotonic() + 60
    while slurm.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)


def submit(slurm: real_slurm.Cluster, checkout: Path, *sbatch_args: str, extra: str = "", cwd: Path | None = None,
           cpus: int = 2, trainers: int = 2, **env: str) -> int:
    """slurm/pretrain_7b.sh with the tiny config on `trainers` CPU ranks; the job id."""
    env = {"GPUS_PER_NODE": str(trainers), "CONFIG": "configs/tiny.yaml", "OUTPUT_DIR": str(checkout.parent / "run"),
           "PYTHON": sys.executable, "EXTRA_ARGS": f"{TINY} {extra}", **env}
    return slurm.sbatch("--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cpus}", *sbatch_args,
                        str(checkout / "slurm" / "pretrain_7b.sh"), cwd=cwd or checkout, **env)


def job_log(folder: Path, job_id: int) -> str:
    """The job's output file, where `#SBATCH --output=%x-%j.out` puts it: the submit folder."""
    path = folder / f"transfusion-7b-{job_id}.out"
    return path.read_text() if path.exists() else ""


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for line in lines if "loss" in (r := json.loads(line))]


def wait_for_step(slurm: real_slurm.Cluster, job_id: int, run: Path, step: int, log_dir: Path) -> None:
    while not logged_steps(run) or max(logged_steps(run)) < step:
        state = slurm.job(job_id)["JobState"]
        assert state in ("RUNNING", "PENDING", "CONFIGURING"), f"{state}: {job_log(log_dir, job_id)[-3000:]}"
        time.sleep(0.1)


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")  # dev extra
    proc = subprocess.run([shellcheck, "-x", *map(str, (REPO / "slurm").glob("*.sh"))], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


def test_a_job_runs_from_the_spool_copy_and_completes(slurm, checkout):
    job = submit(slurm, checkout, extra="train.steps=3")
    info = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = job_log(checkout, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    port = 15000 + job % 15000  # derived from the job id (free on a fresh cluster)
    assert re.search(rf"job {job}: 1 node\(s\) x 2 trainer\(s\), 1 OMP thread\(s\) each, rendezvous \S+:{port},", log)
    assert "done: 3 steps" in log and logged_steps(checkout.parent / "run") == [1, 2, 3]


def test_submitted_outside_the_checkout_fails_with_one_line(slurm, checkout, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = submit(slurm, checkout, extra="train.steps=1", cwd=elsewhere)
    assert slurm.wait_for(job, {"FAILED", "COMPLETED"})["ExitCode"] == "2:0"
    log = job_log(elsewhere, job).splitlines()
    assert len(log) == 1 and log[0].startswith("pretrain_7b.sh: cannot find the repository"), log


def test_a_config_error_is_one_line_and_the_job_fails(slurm, checkout, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = submit(slurm, checkout, extra="model.d_modle=3", cwd=elsewhere, REPO=str(checkout))  # REPO: found anyway
    info = slurm.wait_for(job, {"FAILED", "COMPLETED"})
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert job_log(elsewhere, job).splitlines() == [
        "config error: unknown config key 'model.d_modle' (did you mean 'd_model'?)"]


def test_a_time_limit_below_twice_the_signal_lead_is_refused(slurm, checkout):
    """--time=11 with the script's --signal=USR1@600 would signal every run after a minute: requeue forever."""
    job = submit(slurm, checkout, "--time=11", extra="train.steps=1")
    info = slurm.wait_for(job, {"FAILED", "COMPLETED"})
    log = job_log(checkout, job).splitlines()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert len(log) == 1 and log[0].startswith(
        "pretrain_7b.sh: the time limit 11:00 is not well above the USR1 sent 600 s before it"), log
    assert "at least 20 min" in log[0] and not (checkout.parent / "run" / "metrics.jsonl").exists()


def test_the_timed_usr1_saves_requeues_and_resumes_bit_identically(slurm, checkout, tmp_path):
    """The job's limit is lowered once it runs, so that SLURM's own timer sends the script's
    --signal=USR1@600 within its next check (<= ~30 s); the requeued run is stopped by scancel."""
    run = checkout.parent / "run"
    job = submit(slurm, checkout, "--time=30", extra="train.steps=100000")
    while f"job {job}: 1 node(s)" not in job_log(checkout, job):  # past the batch script's time-limit check
        assert slurm.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), job_log(checkout, job)
        time.sleep(0.05)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")  # 10 min - 600 s: the signal is due now
    slurm.wait_for(job, {"PENDING"})  # requeued
    saved = int((run / "REQUEUE").read_text())
    log = job_log(checkout, job)
    assert f"saved step {saved} on a preemption signal; requeueing job {job}" in log, log[-3000:]
    assert (run / "checkpoints" / f"step_{saved:08d}").is_dir() and max(logged_steps(run)) == saved
    slurm.release_requeued(job, "TimeLimit=30")  # the next run is not signalled at once
    wait_for_step(slurm, job, run, saved + 3, checkout)
    slurm.run("scancel", str(job))
    info = slurm.wait_for(job, {"CANCELLED", "COMPLETED", "FAILED"})
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "1")
    log = job_log(checkout, job)
    assert f"resuming at step {saved}" in log, log[-3000:]
    got = losses(run)
    assert sorted(got) == list(range(1, max(got) + 1)) and max(got) > saved  # no step lost or repeated

    ref = tmp_path / "ref"  # the same layout, uninterrupted
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "-m", "trainer.train",
         "--config", "configs/tiny.yaml", *TINY.split(), f"train.steps={max(got)}", f"train.output_dir={ref}"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert got == losses(ref)  # bitwise


def test_scancel_saves_and_ends_cancelled_without_requeue(slurm, checkout):
    run = checkout.parent / "run"
    job = submit(slurm, checkout, extra="train.steps=100000")
    wait_for_step(slurm, job, run, 1, checkout)
    slurm.run("scancel", str(job))
    info = slurm.wait_for(job, {"CANCELLED", "COMPLETED", "FAILED", "PENDING"})
    log = job_log(checkout, job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-3000:]
    step = max(logged_steps(run))
    assert f"stop signal (SIGTERM): saved step {step}" in log and "requeueing" not in log, log[-3000:]
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir() and not (run / "REQUEUE").exists()
    time.sleep(3)
    assert slurm.job(job)["JobState"] == "CANCELLED"  # and it stays so


def test_a_usr1_during_start_up_is_honoured(slurm, checkout):
    """Sent as soon as the job step exists: the launcher and torchrun start, the trainers import."""
    run = checkout.parent / "run"
    job = submit(slurm, checkout, extra="train.steps=100000")
    while f"{job}.0" not in slurm.steps(job):
        assert slurm.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), job_log(checkout, job)
        time.sleep(0.02)
    assert not (run / "metrics.jsonl").exists()
    slurm.run("scancel", "--signal=USR1", str(job))
    slurm.wait_for(job, {"PENDING"})  # requeued
    log = job_log(checkout, job)
    assert "SIGUSR1 arrived during start-up" in log, log[-3000:]
    assert f"saved step 1 on a preemption signal; requeueing job {job}" in log, log[-3000:]
    assert (run / "REQUEUE").read_text() == "1\n" and logged_steps(run) == [1]
    slurm.run("scancel", str(job))  # while pending: it never runs again


def test_two_jobs_on_one_node_train_side_by_side(slurm, checkout):
    """Each gets its own rendezvous port (from its job id); with one fixed port the second joined the
    first one's store and died when it ended."""
    jobs = [submit(slurm, checkout, cpus=1, trainers=1, extra=f"parallel.dp_shard=1 train.steps={n}",
                   OUTPUT_DIR=str(checkout.parent / f"run{n}")) for n in (30, 31)]
    for job in jobs:
        slurm.wait_for(job, {"RUNNING"}, timeout=60)  # both at once: one CPU each on the 2-CPU node
    infos = [slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) for job in jobs]
    logs = [job_log(checkout, job) for job in jobs]
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], [log[-2000:] for log in logs]
    start = [datetime.datetime.fromisoformat(i["StartTime"]) for i in infos]
    end = [datetime.datetime.fromisoformat(i["EndTime"]) for i in infos]
    assert max(start) < min(end)  # they overlapped
    ports = [re.search(r"rendezvous \S+:(\d+),", log).group(1) for log in logs]
    assert ports[0] != ports[1]
    assert [max(logged_steps(checkout.parent / f"run{n}")) for n in (30, 31)] == [30, 31]


def test_under_salloc_a_preemption_saves_with_nothing_to_requeue(slurm, checkout):
    run = checkout.parent / "run"
    env = {**slurm.env, "GPUS_PER_NODE": "2", "CONFIG": "configs/tiny.yaml", "OUTPUT_DIR": str(run),
           "PYTHON": sys.executable, "EXTRA_ARGS": f"{TINY} train.steps=100000"}
    proc = subprocess.Popen(["salloc", "--job-name=salloc-test", "--gpus-per-node=0", "--cpus-per-task=2", "bash",
                             str(checkout / "slurm" / "pretrain_7b.sh")], cwd=checkout, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (run / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        job = slurm.run("squeue", "-h", "-n", "salloc-test", "-o", "%i").stdout.split()[0]
        slurm.run("scancel", "--signal=USR1", job)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    step = int((run / "REQUEUE").read_text())
    assert (f"saved step {step} on a preemption signal; not a batch job (salloc, or no SLURM): nothing to "
            "requeue, run again to resume") in out
    assert "requeueing" not in out


def test_encode_latents_array_and_merge_jobs_write_shards(slurm, checkout, tmp_path):
    from streaming import LocalDataset

    from examples.tiny_assets import make_tiny_tokenizer, make_tiny_vae
    from tests.helpers import write_mixed_set

    work = tmp_path / "work"  # run outside the checkout, with relative paths
    mixed = write_mixed_set(work / "in")
    tok = make_tiny_tokenizer(work / "tok" / "tiny")
    vae = make_tiny_vae(work / "vae", resolution=16)
    cmd = ["bash", str(checkout / "slurm" / "encode_latents.sh"), "2", "shards", "--",
           "--input", "in/manifest.jsonl", "--vae", os.path.relpath(vae, work), "--tokenizer",
           os.path.relpath(tok, work), "--resolution", "16", "--min-size", "8", "--batch-size", "4",
           "--chunk-size", "5"]
    env = {**slurm.env, "CPUS": "1", "GPUS": "0", "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    array, merge = map(int, re.match(r"submitted array job (\d+) \(0-1\) and merge job (\d+)", proc.stdout).groups())
    logs = work / "shards" / "logs"
    info = slurm.wait_for(merge, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    assert info["JobState"] == "COMPLETED", "".join(p.read_text() for p in logs.glob("*.log"))[-3000:]
    assert sorted(p.name for p in logs.iterdir()) == [f"encode_{array}_0.log", f"encode_{array}_1.log",
                                                     f"merge_{merge}.log"]
    assert sorted(p.name for p in (work / "shards").glob("part-*")) == ["part-00000", "part-00001"]
    assert len(LocalDataset(str(work / "shards"))) == len(mixed["good"])
    assert json.loads((work / "shards" / "report.json").read_text())["complete"]


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


def test_a_rendezvous_store_that_goes_away_is_one_line_and_no_requeue(tmp_path):
    """Another job's store on our port (what a fixed MASTER_PORT did): when it ends, one line naming
    the endpoint, exit 1, and the trainers' TERM from torchrun is a stop, not a preemption."""
    port = free_port()
    store = subprocess.Popen([sys.executable, "-c", "import datetime, sys, time; from torch.distributed import "
                              "TCPStore; s = TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, "
                              "wait_for_workers=False); print('up', flush=True); time.sleep(600)", str(port)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert store.stdout.readline().strip() == "up"
        cmd = [sys.executable, str(REPO / "slurm" / "elastic_run.py"), "--nnodes=1", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=other-job", "-m",
               "trainer.train", "--config", "configs/tiny.yaml", *TINY.split(), "parallel.dp_shard=1",
               "train.steps=100000", f"train.output_dir={tmp_path}"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not (tmp_path / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
    finally:
        store.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "frame #" not in err, err[-3000:]
    assert re.fullmatch(rf".*: rendezvous at 127\.0\.0\.1:{port} failed \(RendezvousConnectionError: .*\); if "
                        "another job uses that port, set MASTER_PORT", err.strip().splitlines()[-1]), err[-3000:]
    assert not (tmp_path / "REQUEUE").exists()


def test_signal_lead_and_time_parsing(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=1:00:00\n#SBATCH --signal=B:USR1@90\necho\n")
    probe = ('source slurm/job_checks.sh; for t in 5:00 11:00 1:00:00 2-03:04:05 UNLIMITED; do '
             'echo "$(time_seconds $t)"; done; signal_lead "$1"; SBATCH_SIGNAL=USR1@45 signal_lead "$1"')
    out = subprocess.run(["bash", "-c", probe, "probe", str(script)], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split("\n") == ["300", "660", "3600", str(((2 * 24 + 3) * 60 + 4) * 60 + 5), "", "90", "45", ""]
