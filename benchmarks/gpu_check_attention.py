"""Part 2 of benchmarks/gpu_check.py: the span-attention backends timed on packed training rows.

Rows come from the trainer's own packer (trainer.data.build_loader, synthetic source, the planner's
PLAN_DEFAULTS: about as many image as text positions, the 1:1 mix of the 7B recipe) at the shapes of
configs/7b.yaml (32 heads x d128, rows of 4096, 256-patch images); spans kv_lo/kv_hi are the batch's.
The same documents are packed twice: images bidirectional (the model) and causal
(`model.image_attention: causal`), the only case flash-attn (document-causal rows) can run.

Each backend of kernels.span_attention (sdpa first: the reference), forward (no grad) and
forward+backward (autograd.grad of q, k, v), in bf16 on CUDA with CUDA-event timing, median of
`reps` after warm-up (the first calls compile flex and triton). Per-batch work each backend caches
for all layers (flex's BlockMask, triton's block bounds, flash's cu_seqlens) is built during warm-up,
as it is once per batch in training. Useful FLOPs count only (query, key) pairs inside the spans, as
model/flops.py does: forward 4 * head_dim * heads * pairs (QK^T and PV); forward+backward
(1 + 2.5) x that, FlashAttention's convention (the backward's five matmuls, QK^T recomputed). A
backend that cannot run is reported with its probe's reason (kernels.dispatch), one that fails with
its error. Each output is checked against sdpa's: max |difference| / max |sdpa|.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("sdpa", "triton", "flex", "flash")  # sdpa first: the reference for ratios and errors
MODES = ("forward", "forward_backward")
BWD_OVER_FWD = 2.5


def attention(smoke: bool, rows: int | None = None, reps: int | None = None) -> dict[str, Any]:
    """Time every backend on each case; the 7B shapes in bf16 on CUDA, or tiny shapes on CPU (smoke)."""
    from config import load_config
    from planner.plan import PLAN_DEFAULTS
    from trainer.data import build_loader

    name, device = ("tiny", "cpu") if smoke else ("7b", "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    rows, reps = rows or (2 if smoke else 4), reps or (2 if smoke else 20)
    warmup = 1 if smoke else 5
    if smoke:  # a CPU compile of flex per shape costs ~15 s; eager proves the plumbing
        from kernels import flex

        flex.COMPILE = False
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    result: dict[str, Any] = {
        "config": f"configs/{name}.yaml", "device": device, "dtype": str(dtype).removeprefix("torch."),
        "warmup": warmup, "reps": reps, "timing": "CUDA events, median" if device == "cuda" else "perf_counter, median",
        "flops": f"forward 4 * head_dim * heads * span pairs; forward_backward x{1 + BWD_OVER_FWD}",
        "flex": "eager (smoke)" if smoke else "torch.compile", "cases": [],
    }
    for seq_len in ((64, 128) if smoke else (None,)):  # None: the config's 4096
        for image_attention in ("bidirectional", "causal"):
            overrides = [*PLAN_DEFAULTS, f"train.batch_size={rows}", f"model.image_attention={image_attention}",
                         *([f"train.seq_len={seq_len}"] if seq_len else [])]
            cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
            batch = next(build_loader(cfg))
            case = time_case(cfg, batch, device, dtype, warmup, reps)
            case["overrides"] = overrides
            result["cases"].append(case)
            print_case(case)
    return result


def time_case(cfg: Any, batch: Any, device: str, dtype: torch.dtype, warmup: int, reps: int) -> dict[str, Any]:
    from kernels.spans import is_document_causal
    from model.flops import span_pairs

    m = cfg.model
    B, S = batch.kv_lo.shape
    H, H_kv, D = m.n_heads, m.kv_heads, m.head_dim
    lo, hi = batch.kv_lo.to(device), batch.kv_hi.to(device)
    pairs = int(span_pairs(lo, hi))
    fwd_flops = 4.0 * D * H * pairs
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, h, D, generator=gen, device=device, dtype=dtype) for h in (H, H_kv, H_kv))
    dout = torch.randn(B, S, H, D, generator=gen, device=device, dtype=dtype)
    case: dict[str, Any] = {
        "image_attention": m.image_attention, "rows": B, "seq_len": S, "heads": H, "kv_heads": H_kv, "head_dim": D,
        "images": batch.num_images, "image_positions": float(batch.is_image.float().mean()),
        "padding": float((batch.kv_hi <= batch.kv_lo).float().mean()), "mask_density": pairs / (B * S * S),
        "document_causal": is_document_causal(lo, hi), "forward_gflop": fwd_flops / 1e9, "backends": {},
    }
    timer = cuda_ms if device == "cuda" else cpu_ms
    reference: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in BACKENDS:
        case["backends"][name] = {}
        for mode in MODES:
            flops = fwd_flops * (1 if mode == "forward" else 1 + BWD_OVER_FWD)
            entry, outs = run_one(name, mode, (q, k, v, lo, hi, dout), timer, warmup, reps, flops)
            if outs is not None:
                if name == "sdpa":
                    reference[mode] = outs
                elif mode in reference:
                    entry["max_err_vs_sdpa"] = max(
                        float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
                        for a, b in zip(outs, reference[mode]))
            case["backends"][name][mode] = entry
        if device == "cuda":
            torch.cuda.empty_cache()
    for name, modes in case["backends"].items():
        for mode, entry in modes.items():
            base = case["backends"]["sdpa"][mode]
            if entry["status"] == "ok" and base["status"] == "ok":
                entry["speedup_vs_sdpa"] = base["ms"] / entry["ms"]
    return case


def run_one(
    name: str, mode: str, tensors: tuple[torch.Tensor, ...], timer: Callable, warmup: int, reps: int, flops: float,
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...] | None]:
    """One backend, one mode: (report entry, outputs of the first call) or the reason it cannot run."""
    from kernels import backend_unavailable, span_attention

    q, k, v, lo, hi, dout = tensors
    grad = mode == "forward_backward"
    qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
    with torch.set_grad_enabled(grad):
        reason = backend_unavailable(name, qq, lo, hi)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}, None

    def fn() -> tuple[torch.Tensor, ...]:
        if grad:
            return torch.autograd.grad(span_attention(qq, kk, vv, lo, hi, backend=name), (qq, kk, vv), dout)
        with torch.no_grad():
            return (span_attention(qq, kk, vv, lo, hi, backend=name),)

    try:
        ms, outs = timer(fn, warmup, reps)
    except Exception as e:  # noqa: BLE001 - a backend that fails is reported, the others still run
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:800]}, None
    return {"status": "ok", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}, outs


def cuda_ms(fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, Any]:
    """Median milliseconds of fn() between CUDA events after `warmup` calls; and the first call's result."""
    first = fn()
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), first


def cpu_ms(fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, Any]:
    """Median wall milliseconds of fn() after `warmup` calls; and the first call's result."""
    first = fn()
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), first


def describe(case: dict[str, Any]) -> str:
    return (f"{case['rows']} rows x {case['seq_len']}, {case['heads']}/{case['kv_heads']} heads x d{case['head_dim']}, "
            f"images {case['image_attention']}: {case['images']} images ({case['image_positions']:.0%} of positions), "
            f"padding {case['padding']:.1%}, mask density {case['mask_density']:.3f}, "
            f"forward {case['forward_gflop']:.3g} GFLOP useful")


def cells(modes: dict[str, dict[str, Any]]) -> list[str]:
    """fwd ms, TFLOP/s, x sdpa, fwd+bwd ms, TFLOP/s, x sdpa, max errors ('n/a' where it did not run)."""
    out = []
    for mode in MODES:
        e = modes[mode]
        if e["status"] != "ok":
            out += ["n/a", "", ""]
            continue
        speed = e.get("speedup_vs_sdpa")
        out += [f"{e['ms']:.3f}", f"{e['tflops']:.4g}", "-" if speed is None else f"{speed:.2f}x"]
    errs = [modes[m].get("max_err_vs_sdpa") for m in MODES]
    return out + [" / ".join("-" if x is None else f"{x:.1e}" for x in errs)]


def notes(modes: dict[str, dict[str, Any]]) -> list[str]:
    """Why a backend did not run, once per distinct reason."""
    why = {m: f"{modes[m]['status']}: {modes[m].get('reason') or modes[m].get('error')}"
           for m in MODES if modes[m]["status"] != "ok"}
    if len(why) == 2 and len(set(why.values())) == 1:
        return [f"forward and fwd+bwd {why['forward']}"]
    return [f"{m.replace('forward_backward', 'fwd+bwd')} {w}" for m, w in why.items()]


HEADER = ["backend", "fwd ms", "TFLOP/s", "vs sdpa", "fwd+bwd ms", "TFLOP/s", "vs sdpa",
          "max err vs sdpa (fwd / grads)"]


def print_case(case: dict[str, Any]) -> None:
    print(describe(case))
    widths = [8, 10, 10, 8, 11, 10, 8, 0]
    print("  " + " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADER, widths))))
    for name, modes in case["backends"].items():
        row = [name, *cells(modes)]
        print("  " + " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        for n in notes(modes):
            print(f"      {name} {n}")


def markdown_rows(result: dict[str, Any]) -> list[str]:
    """Markdown tables of gpu_check.json's attention part."""
    lines = [f"{result['config']}, {result['dtype']} on {result['device']}, {result['timing']} of {result['reps']} "
             f"after {result['warmup']} warm-up; flex {result['flex']}; FLOPs: {result['flops']}", ""]
    for case in result["cases"]:
        lines += [f"**{describe(case)}**", "", "| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
        lines += ["| " + " | ".join([name, *cells(modes)]) + " |" for name, modes in case["backends"].items()]
        lines += [""] + [f"- {name} {n}" for name, modes in case["backends"].items() for n in notes(modes)] + [""]
    return lines
