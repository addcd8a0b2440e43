"""A SLURM stand-in for tests: `sbatch`, `srun` and `scontrol` that act like slurmd where the scripts
in slurm/ depend on it, running every job at once on this machine (one node).

sbatch reads the script's #SBATCH lines (up to its first command; its own options win), copies the
script into a spool folder (<state>/spool/job<id>/slurm_script) and runs that copy in the submit
folder (or --chdir), with SLURM_SUBMIT_DIR, SLURM_JOB_ID, SLURM_NNODES, SLURM_CPUS_PER_TASK,
SLURM_JOB_NODELIST... set, its output in the --output/--error file opened as slurmd opens it: when
the file cannot be opened (its folder does not exist), the job fails without running and without
any log. Jobs run at submission, one after another (array tasks in order), each in its own
session; `--wait` returns the job's exit code; a job whose `afterok` dependency failed never runs.
srun records its options in <state>/srun.jsonl, runs its command as a job step in a new session
limited to --cpus-per-task CPUs (one without it, as SLURM >= 22.05 does), and forwards the signals
real srun forwards to every process of the step. `scontrol show hostnames` prints localhost (the one
node is this machine); other scontrol commands (requeue) are appended to <state>/scontrol.log.
The state folder is $FAKE_SLURM_DIR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

SBATCH_VALUES = {"job-name", "output", "error", "chdir", "array", "dependency", "nodes", "ntasks-per-node",
                 "gpus-per-node", "cpus-per-task", "time", "signal", "open-mode", "partition", "account", "gres",
                 "mem", "export"}
SBATCH_FLAGS = {"requeue", "no-requeue", "parsable", "wait", "exclusive"}
SRUN_VALUES = {"nodes", "ntasks", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "export", "chdir",
               "kill-on-bad-exit"}
SRUN_FLAGS = {"label", "unbuffered"}
SHORT = {"J": "job-name", "o": "output", "e": "error", "D": "chdir", "a": "array", "d": "dependency",
         "N": "nodes", "c": "cpus-per-task", "t": "time", "p": "partition", "A": "account", "n": "ntasks",
         "K": "kill-on-bad-exit"}
FORWARDED = (signal.SIGINT, signal.SIGQUIT, signal.SIGCONT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM,
             signal.SIGUSR1, signal.SIGUSR2)  # what real srun passes on to its step


class Usage(Exception):
    """A command line the real tool would refuse."""


def state_dir() -> Path:
    """The folder holding spool copies, job results and logs of this fake cluster."""
    return Path(os.environ["FAKE_SLURM_DIR"])


def parse_options(args: list[str], values: set[str], flags: set[str]) -> tuple[dict[str, str], list[str]]:
    """`--name=value`, `--name value`, `-X value` and `--flag` options up to the first operand."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
        elif arg[1:2] in SHORT:
            name, value, eq = SHORT[arg[1]], arg[2:], "=" if len(arg) > 2 else ""
        else:
            raise Usage(f"unknown option {arg}")
        if name in flags and not eq:
            opts[name] = "1"
        elif name in values:
            if not eq:
                i += 1
                if i == len(args):
                    raise Usage(f"option --{name} needs a value")
                value = args[i]
            opts[name] = value
        else:
            raise Usage(f"unknown option {arg}")
        i += 1
    return opts, args[i:]


def script_directives(text: str) -> list[str]:
    """The #SBATCH options of a batch script, read as sbatch does: up to its first command."""
    found: list[str] = []
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            found += stripped[len("#SBATCH"):].split("#")[0].split()
    return found


def array_indexes(spec: str) -> list[int]:
    """`0-3`, `1,5,7`, `0-9:2`, each optionally followed by a `%N` throttle (ignored: tasks run in order)."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise Usage(f"invalid --array {spec!r}")
        lo, hi, stride = int(m[1]), int(m[2] or m[1]), int(m[3] or 1)
        out += range(lo, hi + 1, stride)
    return out


def next_job_id() -> int:
    """Job ids count up from $FAKE_SLURM_FIRST_JOB_ID (4242)."""
    counter = state_dir() / "next_job_id"
    job_id = int(counter.read_text()) if counter.exists() else int(os.environ.get("FAKE_SLURM_FIRST_JOB_ID", "4242"))
    counter.write_text(str(job_id + 1))
    return job_id


def expand(pattern: str, job: dict) -> str:
    """slurmd's filename patterns: %x job name, %j job id, %A array job id, %a task index, %N node, %u user."""
    subs = {"x": job["name"], "j": str(job["id"]), "A": str(job["array_id"]), "a": str(job.get("index", "")),
            "N": "localhost", "u": os.environ.get("USER", "user"), "%": "%"}
    return re.sub(r"%([xjAaNu%])", lambda m: subs[m[1]], pattern)


def dependency_met(spec: str) -> bool:
    """`afterok:ID[:ID...]` (every task of each job exited 0) and `afterany:ID...` (finished: always here)."""
    for clause in spec.split(","):
        kind, *ids = clause.split(":")
        if kind not in ("afterok", "afterany"):
            raise Usage(f"unsupported --dependency {spec!r}")
        for job_id in ids:
            codes = [p.read_text().strip() for p in state_dir().glob(f"spool/job*/array{job_id}.exit")]
            if not codes:
                raise Usage(f"--dependency names job {job_id}, which was never submitted")
            if kind == "afterok" and any(c != "0" for c in codes):
                return False
    return True


def run_batch(job: dict, script: str, opts: dict[str, str], submit_dir: Path) -> int:
    """What slurmd does with one job: spool copy, open the output files, run the copy, record the result."""
    spool = state_dir() / "spool" / f"job{job['id']}"
    spool.mkdir(parents=True)
    copy = spool / "slurm_script"
    copy.write_text(script)
    copy.chmod(0o500)
    workdir = Path(opts.get("chdir", submit_dir))
    default_out = "slurm-%A_%a.out" if "index" in job else "slurm-%j.out"
    mode = "a" if opts.get("open-mode") == "append" else "w"
    exit_file = spool / f"array{job['array_id']}.exit"
    try:
        out = open(workdir / expand(opts.get("output", default_out), job), mode)  # noqa: SIM115
        err = open(workdir / expand(opts["error"], job), mode) if "error" in opts else out  # noqa: SIM115
    except OSError as e:
        print(f"fake slurmd: job {job['id']} failed before it started: cannot open its output: {e}", file=sys.stderr)
        exit_file.write_text("1")
        return 1
    env = {**os.environ, "SLURM_JOB_ID": str(job["id"]), "SLURM_JOBID": str(job["id"]), "SLURM_JOB_NAME": job["name"],
           "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_SUBMIT_HOST": socket.gethostname(),
           "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_CLUSTER_NAME": "fake",
           "SLURM_JOB_NODELIST": os.environ.get("FAKE_SLURM_NODELIST", "node001"), "SLURMD_NODENAME": "node001",
           "SLURM_RESTART_COUNT": "0"}
    for name in ("cpus-per-task", "ntasks-per-node", "gpus-per-node"):
        if name in opts:
            env["SLURM_" + name.upper().replace("-", "_")] = opts[name]
    if "index" in job:
        env.update(SLURM_ARRAY_JOB_ID=str(job["array_id"]), SLURM_ARRAY_TASK_ID=str(job["index"]),
                   SLURM_ARRAY_TASK_COUNT=str(job["count"]))
    with out, err:
        try:
            proc = subprocess.Popen([str(copy)], cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
        except OSError as e:
            print(f"fake slurmd: job {job['id']} could not start: {e}", file=err)
            exit_file.write_text("1")
            return 1
        (spool / "batch.pid").write_text(str(proc.pid))
        code = proc.wait()
    exit_file.write_text(str(code))
    return code if code >= 0 else 128 - code


def sbatch(args: list[str]) -> int:
    """Submit (and at once run) a batch script given as a path or on stdin."""
    cli, rest = parse_options(args, SBATCH_VALUES, SBATCH_FLAGS)
    script = Path(rest[0]).read_text() if rest else sys.stdin.read()
    if not script.startswith("#!"):
        raise Usage("This does not look like a batch script. The first line must start with #! followed by the "
                    "path to an interpreter.")
    header, _ = parse_options(script_directives(script), SBATCH_VALUES, SBATCH_FLAGS)
    opts = {**header, **cli}
    if opts.get("nodes", "1") != "1":
        raise Usage(f"this fake cluster has one node; got --nodes={opts['nodes']}")
    job_id = next_job_id()
    name = opts.get("job-name", Path(rest[0]).name if rest else "sbatch")
    print(job_id if "parsable" in opts else f"Submitted batch job {job_id}", flush=True)
    if "dependency" in opts and not dependency_met(opts["dependency"]):
        print(f"fake slurmctld: job {job_id} never runs: DependencyNeverSatisfied ({opts['dependency']})",
              file=sys.stderr)
        return 1 if "wait" in opts else 0
    submit_dir = Path.cwd()
    if "array" in opts:
        indexes = array_indexes(opts["array"])
        ids = [job_id] + [next_job_id() for _ in indexes[1:]]
        codes = [run_batch({"id": i, "array_id": job_id, "index": idx, "count": len(indexes), "name": name},
                           script, opts, submit_dir) for i, idx in zip(ids, indexes)]
    else:
        codes = [run_batch({"id": job_id, "array_id": job_id, "name": name}, script, opts, submit_dir)]
    return max(codes) if "wait" in opts else 0


def step_processes(leader: int) -> list[int]:
    """Every process descended from `leader` (itself included): what slurmstepd's cgroup holds for a step."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [leader]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def signal_step(leader: int, sig: int) -> None:
    """Send `sig` to every process of the step led by `leader`, as slurmstepd does."""
    for pid in step_processes(leader):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def srun(args: list[str]) -> int:
    """Run one task of a job step on this node, in its own session, and wait for it."""
    opts, command = parse_options(args, SRUN_VALUES, SRUN_FLAGS)
    if not command:
        raise Usage("srun: no command given")
    if opts.get("ntasks-per-node", "1") != "1" or opts.get("nodes", "1") != "1":
        raise Usage(f"this fake cluster runs one task on one node; got {args}")
    job_id = os.environ["SLURM_JOB_ID"]
    steps = state_dir() / "steps"
    steps.mkdir(exist_ok=True)
    step_id = len(list(steps.glob(f"{job_id}.*.pid")))
    with open(state_dir() / "srun.jsonl", "a") as log:
        log.write(json.dumps({"job": job_id, "step": step_id, "options": opts, "command": command}) + "\n")
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: max(1, min(len(cpus), int(opts.get("cpus-per-task", "1"))))])
    env = {**os.environ, "SLURM_STEP_ID": str(step_id), "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    if "cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
    leader: list[int] = []  # handlers first: a signal that comes while the step starts does not kill srun

    def forward(signum: int, frame: object) -> None:
        for pid in leader:
            signal_step(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    leader.append(proc.pid)
    (steps / f"{job_id}.{step_id}.pid").write_text(str(proc.pid))
    code = proc.wait()
    return code if code >= 0 else 128 - code


def scontrol(args: list[str]) -> int:
    """`show hostnames` (this machine) and a log of every other command."""
    if args[:2] == ["show", "hostnames"]:
        print("localhost")
        return 0
    with open(state_dir() / "scontrol.log", "a") as log:
        log.write(" ".join(args) + "\n")
    return 0


def install(bindir: Path, state: Path) -> dict[str, str]:
    """Write sbatch/srun/scontrol into `bindir`; returns the environment that puts them first on PATH."""
    bindir.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    for tool in ("sbatch", "srun", "scontrol"):
        path = bindir / tool
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {tool} "$@"\n')
        path.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}


def main(argv: list[str]) -> int:
    """Dispatch to the tool named by the first argument."""
    tools = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol}
    try:
        return tools[argv[0]](argv[1:])
    except Usage as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
