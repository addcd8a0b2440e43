"""A real one-node SLURM for the tests: Debian's slurm-wlm and munge, started as daemons under a test
folder (tests/slurm/slurm.conf.in, own ports and munge socket) and stopped by PID.

Every client command reaches it through SLURM_CONF in `Cluster.env`. Unavailable (not root, or the
packages absent: `apt-get install slurm-wlm munge`) -> `start` returns the reason instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.parallel_worker import free_port

TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf.in"
WAITING = {"None", "Priority", "Resources", "BeginTime", "Dependency"}  # pending reasons that pass
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "salloc", "scontrol", "squeue", "sinfo", "scancel")


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    pids: dict[str, int]

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, cwd: Path, **env: str) -> int:
        """Submit; the job id."""
        proc = subprocess.run(["sbatch", *args], cwd=cwd, env={**self.env, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {proc.stderr.strip()}")
        return int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for(self, job_id: int, states: set[str], timeout: float = 300) -> dict[str, str]:
        """Poll until the job's state is one of `states`; its fields then."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in states:
            if job["JobState"] == "PENDING" and job.get("Reason") not in WAITING:
                raise RuntimeError(f"job {job_id} cannot start: {job.get('Reason')}")
            if job["JobState"] in ENDED:
                raise RuntimeError(f"job {job_id} ended {job['JobState']} (exit {job.get('ExitCode')}) while "
                                   f"waiting for {sorted(states)}; its log: {job.get('StdOut')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['JobState']} ({job.get('Reason')}) after {timeout} s")
            time.sleep(0.2)
        return job

    def steps(self, job_id: int) -> list[str]:
        return self.run("squeue", "-h", "-s", "-j", str(job_id), "-o", "%i").stdout.split()

    def release_requeued(self, job_id: int, *updates: str) -> None:
        """A requeued job waits ~2 min (SLURM's BeginTime); start it now instead (with `updates`, e.g.
        TimeLimit=30, applied first)."""
        self.wait_for(job_id, {"PENDING"})
        # slurmd refuses ("Job credential revoked") a launch credential made in the same second as
        # the requeue's revocation: SLURM's own delay avoids that; so does waiting 2 s.
        time.sleep(2)
        if updates:
            self.run("scontrol", "update", f"JobId={job_id}", *updates)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def _wait(what: str, ready, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in {timeout} s")
        time.sleep(0.1)


def unavailable() -> str | None:
    """Why a real SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "the real-SLURM tests run slurmd as root"
    missing = [d for d in DAEMONS if not shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)" if missing else None


def start(root: Path) -> Cluster:
    """munged, slurmctld and slurmd for one node (this machine's CPUs and memory), under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    (root / "munge").mkdir(mode=0o700)
    for name in ("ctld", "spool"):
        (root / name).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cpus = os.cpu_count() or 1
    mem_mib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) // 1024
    memory = int(mem_mib * 0.8)
    values = {"HOST": socket.gethostname().split(".")[0], "ROOT": str(root), "CPUS": str(cpus),
              "MEMORY": str(memory), "MEM_PER_CPU": str(memory // cpus),
              "CTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    conf = TEMPLATE.read_text()
    for k, v in values.items():
        conf = conf.replace(f"@{k}@", v)
    (root / "slurm.conf").write_text(conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(SLURM_CONF=str(root / "slurm.conf"), PATH=env.get("PATH", "") + ":/usr/sbin")
    sbin = lambda name: shutil.which(name, path=env["PATH"])  # noqa: E731
    m = root / "munge"
    subprocess.run([sbin("munged"), "--force", f"--socket={m / 'munge.socket'}", f"--key-file={key}",
                    f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}"], check=True, env=env, capture_output=True)
    _wait("munged", (m / "munged.pid").exists)
    cluster = Cluster(root, env, {"munged": int((m / "munged.pid").read_text())})
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([sbin(daemon), "-f", str(root / "slurm.conf")], check=True, env=env, capture_output=True)
            pid_file = root / f"{daemon}.pid"
            _wait(daemon, lambda p=pid_file: p.exists() and p.read_text().strip())
            cluster.pids[daemon] = int(pid_file.read_text())
        _wait("the node", lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle")
    except Exception:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Cancel what still runs, then stop the daemons by PID (slurmd, slurmctld, munged)."""
    cluster.run("scancel", "--full", "--user", "root", check=False)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = cluster.pids.get(name)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
