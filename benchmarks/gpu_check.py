"""The one command to run when a GPU is available (issue 11, point 6); it cannot run in CI.

    python -m benchmarks.gpu_check [--out outputs/gpu_check] [--steps 300] [--skip-tests] [--skip-attention]
                                   [--skip-train] [--attn-rows 4] [--reps 20] [--set key=value ...]
    make gpu-check GPU_CHECK_ARGS="..."                        # the same through the venv
    python -m benchmarks.gpu_check --cpu-smoke --out /tmp/gc   # plumbing only, no performance meaning

Everything here was verified on CPU only (interpreted kernels, simulated hardware); this command
takes the first measurements on a GPU. Run unchanged on one H100, it does three things:
1. Kernel tests compiled: pytest on tests/test_kernels_*.py in a subprocess with TRITON_INTERPRET
   unset and TRANSFUSION_TEST_DEVICE=cuda (tests/conftest.py): tensors on the GPU, Triton compiled,
   the fp32 cases also in bf16. Pass/fail counts from pytest's junit XML.
2. Attention timing (benchmarks/gpu_check_attention.py): rows from the trainer's own packer
   (build_loader, synthetic source, the planner's 1:1 image:text mix) at the 7B shapes of
   configs/7b.yaml, forward and forward+backward of kernels.span_attention with backends triton,
   flex, sdpa and flash, in bf16, timed with CUDA events; useful TFLOP/s from the spans and ratios vs
   sdpa. The same rows with causal image attention give flash-attn (document-causal only) a case.
3. Training: the real trainer (trainer.train.train) on configs/160m.yaml, synthetic data, N steps,
   in this process; tokens/s, model TFLOP/s and MFU from its metrics.jsonl over the steps after the
   first 20, peak memory from torch.cuda.max_memory_allocated, each next to the planner's prediction
   (planner.plan.plan_layout, same config, world size 1, the GPU entry matching the device name).
Writes OUT/gpu_check.json and OUT/gpu_check.md. Exit 0 when every part ran and the kernel tests
passed, 1 otherwise, 2 (one line) without a CUDA GPU unless --cpu-smoke, which runs every part on
CPU with tiny shapes to prove the plumbing: one interpreted kernel test, the tiny config's rows at
64 and 128 positions (sdpa, interpreted triton, eager flex), the tiny config trained 5 steps and
planned against the h100 entry as a stand-in. No GPU figure is printed or recorded unless it was
measured on the GPU here (on CPU, peak memory and MFU stay null).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMOKE_NOTE = "cpu-smoke: no performance meaning"
NO_GPU = "gpu_check needs a CUDA GPU (none is visible); --cpu-smoke checks the plumbing on CPU"
SMOKE_TESTS = ["tests/test_kernels_triton.py", "-k", "low_precision and bf16"]  # one quick interpreted test
STEADY_SKIP = 20  # steps left out of the training averages (compilation, allocator warm-up)
GiB = 1 << 30
TRAIN_DEFINITIONS = (
    "measured: the trainer's metrics.jsonl (step wall time including fetching the step's batches; tokens count "
    "every position; model FLOPs from the batches' spans, no recompute; MFU vs the GPU entry's dense bf16 peak), "
    "peak = torch.cuda.max_memory_allocated over the run; planner: plan_layout's roofline step time and peak of "
    "tensors (torch's memory tracker on fake tensors) for the same config")


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


# ----------------------------------------------------------------------------- 1. kernel tests
def kernel_tests(out: Path, smoke: bool) -> dict[str, Any]:
    """pytest on the kernel tests in a subprocess: compiled on CUDA, or interpreted (smoke)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py"))
    targets = SMOKE_TESTS if smoke else files
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRANSFUSION_TEST_DEVICE")}
    env.update({"TRITON_INTERPRET": "1"} if smoke else {"TRANSFUSION_TEST_DEVICE": "cuda"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    xml, log = out / "kernel_tests.xml", out / "kernel_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *targets]
    shown = {k: env[k] for k in ("TRITON_INTERPRET", "TRANSFUSION_TEST_DEVICE") if k in env}
    command = shlex.join([*(f"{k}={v}" for k, v in shown.items()), "python", *cmd[1:]])
    print(command, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    log.write_text(res.stdout + res.stderr)
    counts = junit_counts(xml) if xml.is_file() else {"passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                                                      "failed_tests": ["pytest wrote no report; see the log"]}
    result = {"command": command, "returncode": res.returncode,
              "seconds": round(time.perf_counter() - t0, 1), "log": str(log), **counts}
    tail = res.stdout.strip().splitlines()[-1:] or res.stderr.strip().splitlines()[-1:]
    print(f"passed {counts['passed']}, failed {counts['failed']}, errors {counts['errors']}, skipped "
          f"{counts['skipped']} in {result['seconds']} s ({tail[0] if tail else 'no output'}); log: {log}")
    for name in counts["failed_tests"]:
        print(f"  FAILED {name}")
    return result


def junit_counts(xml: Path) -> dict[str, Any]:
    """passed / failed / errors / skipped and the failing test ids from pytest's junit XML."""
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for key in n:
            n[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"passed": passed, "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"],
            "failed_tests": failed}


# ----------------------------------------------------------------------------- 3. training vs the planner
def training(out: Path, steps: int, smoke: bool, extra: list[str]) -> dict[str, Any]:
    """Train the 160m config (tiny in smoke mode) with the real trainer, and plan the same config."""
    from config import load_config
    from planner.hardware import GPUS, gpu_for_device_name
    from planner.plan import plan_layout
    from trainer.train import train

    name = "tiny" if smoke else "160m"
    run_dir = out / f"train_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    overrides = ["data.source=synthetic", f"train.steps={steps}", "checkpoint.enabled=false",
                 "logging.wandb=disabled", f"train.device={'cpu' if smoke else 'cuda'}",
                 f"train.output_dir={run_dir}", *(["logging.log_every=1"] if smoke else []), *extra]
    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    device_name = "cpu" if smoke else torch.cuda.get_device_name()
    gpu = GPUS["h100"] if smoke else gpu_for_device_name(device_name)
    result: dict[str, Any] = {"config": f"configs/{name}.yaml", "overrides": overrides, "device": device_name,
                              "definitions": TRAIN_DEFINITIONS}
    print(f"config configs/{name}.yaml {' '.join(overrides)}")

    prediction: dict[str, Any] | None = None
    if gpu is None:
        result["planner"] = f"no planner entry for '{device_name}' (known: H100, H200, A100): no prediction"
    else:
        t0 = time.perf_counter()
        rep = plan_layout(cfg, world_size=1, gpu=gpu)  # deep-copies cfg; fake tensors in a subprocess
        prediction = {
            "gpu_entry": gpu.name, "bf16_peak_tflops": gpu.bf16_flops / 1e12, "fits": rep.fits,
            "peak_memory_gib": max(r["peak_gib"] for r in rep.ranks), "step_s": rep.step_s,
            "tokens_per_s": rep.tokens_per_s_per_gpu,
            "model_tflops_per_s": rep.model_flops_per_step / rep.step_s / 1e12,
            "mfu": rep.mfu, "time_split": rep.time_split, "reason": rep.reason,
        }
        result["planner"] = {**prediction, "seconds": round(time.perf_counter() - t0, 1),
                             **({"stand_in": "no GPU here: the h100 entry"} if smoke else {})}
        print(f"planner ({gpu.name}{', stand-in' if smoke else ''}): peak {prediction['peak_memory_gib']:.2f} GiB, "
              f"step {rep.step_s:.4f} s, {rep.tokens_per_s_per_gpu:,.0f} tokens/s, MFU {rep.mfu:.1%}"
              f"{'' if rep.fits else ', DOES NOT FIT: ' + rep.reason}")

    if not smoke:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(copy.deepcopy(cfg))  # train() resolves the layout in place
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    measured = steady_state(run_dir / "metrics.jsonl", min(STEADY_SKIP, steps // 2))
    if smoke:
        measured["peak_memory_gib"] = None
        result["peak_memory_note"] = "not measured on CPU (torch.cuda.max_memory_allocated is CUDA only)"
    else:
        measured["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
    result["measured"] = measured
    keys = ("peak_memory_gib", "step_s", "tokens_per_s", "model_tflops_per_s", "mfu")
    result["comparison"] = {
        k: {"measured": measured.get(k), "predicted": prediction.get(k) if prediction else None,
            "ratio": ratio(measured.get(k), prediction.get(k) if prediction else None)} for k in keys}
    print(f"{'':20} {'measured':>14} {'planner':>14} {'ratio':>7}")
    for k, row in result["comparison"].items():
        print(f"{k:20} {fmt(row['measured']):>14} {fmt(row['predicted']):>14} {fmt(row['ratio']):>7}")
    return result


def steady_state(metrics: Path, skip: int) -> dict[str, Any]:
    """Time-weighted means of the logged windows that start after `skip` steps (metrics.jsonl lines
    summarise the steps since the previous line: trainer/metrics.py window_summary; eval/ lines are
    not training windows)."""
    rows = [r for line in metrics.read_text().splitlines() if line.strip() and "step_s" in (r := json.loads(line))]
    picked, prev = [], 0
    for r in rows:
        if prev >= skip:
            picked.append((r["step"] - prev, r))
        prev = r["step"]
    if not picked:
        raise RuntimeError(f"no logged window after step {skip} in {metrics}: raise --steps")
    secs = [n * r["step_s"] for n, r in picked]
    total = sum(secs)

    def weighted(key: str) -> float | None:
        vals = [r.get(key) for _, r in picked]
        return None if None in vals else sum(s * v for s, v in zip(secs, vals)) / total

    return {"steps": sum(n for n, _ in picked), "skipped_first": skip, "step_s": total / sum(n for n, _ in picked),
            "tokens_per_s": weighted("tokens_per_s"), "model_tflops_per_s": weighted("model_tflops_per_s"),
            "mfu": weighted("mfu"), "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


# ----------------------------------------------------------------------------- report
def run_part(report: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """A part that fails is recorded with its error and the next part still runs."""
    try:
        report[key] = fn()
    except Exception as e:  # noqa: BLE001 - reported, not raised
        traceback.print_exc()
        report[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{key} FAILED: {report[key]['error']}", flush=True)


def environment(smoke: bool) -> dict[str, Any]:
    import importlib.util

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "host": platform.node()}
    for mod in ("triton", "flash_attn"):
        try:
            env[mod] = __import__(mod).__version__ if importlib.util.find_spec(mod) else None
        except Exception as e:  # noqa: BLE001 - e.g. a flash-attn built for another torch
            env[mod] = f"import failed: {type(e).__name__}: {e}"[:300]
    if not smoke:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / GiB, 1), devices_visible=torch.cuda.device_count())
    return env


def markdown(report: dict[str, Any]) -> str:
    """The human summary of gpu_check.json."""
    lines = [f"# GPU check ({report['mode']})", "", f"{report['created']}; " + ", ".join(
        f"{k} {v}" for k, v in report["environment"].items() if v is not None), ""]
    if report["mode"] == "cpu-smoke":
        lines += [f"**{SMOKE_NOTE}**", ""]
    kt = report.get("kernel_tests")
    if kt:
        lines += ["## 1. Kernel tests", "", f"`{kt.get('command', '')}`", "",
                  kt["error"] if "error" in kt else f"passed {kt['passed']}, failed {kt['failed']}, errors "
                  f"{kt['errors']}, skipped {kt['skipped']} ({kt['seconds']} s)", ""]
        lines += [f"- FAILED `{t}`" for t in kt.get("failed_tests", [])]
    at = report.get("attention")
    if at:
        from benchmarks.gpu_check_attention import markdown_rows

        lines += ["", "## 2. Attention", ""] + (
            [at["error"]] if "error" in at else markdown_rows(at))
    tr = report.get("training")
    if tr:
        lines += ["", "## 3. Training vs the planner", ""]
        if "error" in tr:
            lines.append(tr["error"])
        else:
            planner = tr["planner"] if isinstance(tr["planner"], str) else tr["planner"]["gpu_entry"]
            lines += [f"{tr['config']} on {tr['device']}, {tr['measured']['steps']} steady steps after the first "
                      f"{tr['measured']['skipped_first']}; loss {tr['measured']['first_loss']:.3f} -> "
                      f"{tr['measured']['last_loss']:.3f}; planner: {planner}", "",
                      tr["definitions"], "", "| | measured | planner | measured / planner |", "|---|---|---|---|"]
            lines += [f"| {k} | {fmt(r['measured'])} | {fmt(r['predicted'])} | {fmt(r['ratio'])} |"
                      for k, r in tr["comparison"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; 5 with --cpu-smoke)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--attn-rows", type=int, default=None, help="rows of 4096 in the attention batch (default 4)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per kernel (default 20)")
    ap.add_argument("--set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the trained (and planned) config, e.g. --set parallel.compile=true")
    ap.add_argument("--cpu-smoke", action="store_true", help=f"every part on CPU at tiny shapes ({SMOKE_NOTE})")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    # Triton reads TRITON_INTERPRET when first imported (the project imports below): interpreted on CPU
    # for the smoke run, compiled on the GPU.
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("WANDB_SILENT", "true")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu", "note": SMOKE_NOTE if smoke else "measured on this GPU",
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
        "environment": environment(smoke),
    }
    print(f"gpu_check ({report['mode']}): {report['environment']}" + (f"\n{SMOKE_NOTE}" if smoke else ""))
    if not args.skip_tests:
        section("1. kernel tests" + (" (interpreted, one selection)" if smoke else " compiled on the GPU"))
        run_part(report, "kernel_tests", lambda: kernel_tests(out, smoke))
    if not args.skip_attention:
        from benchmarks.gpu_check_attention import attention

        section("2. attention: span kernel vs flex vs sdpa vs flash" + (" (CPU, tiny)" if smoke else ""))
        run_part(report, "attention", lambda: attention(smoke, args.attn_rows, args.reps))
    if not args.skip_train:
        steps = args.steps or (5 if smoke else 300)
        section(f"3. training {'tiny' if smoke else '160m'} for {steps} steps vs the planner")
        run_part(report, "training", lambda: training(out, steps, smoke, args.train_overrides))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"\nreport: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}" + (f" ({SMOKE_NOTE})" if smoke else ""))
    kt = report.get("kernel_tests", {})
    broken = any("error" in report.get(k, {}) for k in ("kernel_tests", "attention", "training"))
    return 1 if broken or kt.get("failed") or kt.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
