"""NVIDIA apex vs what torch already has, on one GPU: the facts behind not depending on apex.

    python benchmarks/apex_vs_torch.py [--dim 4096 --tokens 16384 --params 0.5]

Times, side by side in one run (CUDA events, median of 20 after 5 warm-ups):
- the optimizer step: `torch.optim.AdamW(fused=True)` (what trainer/optim.py uses on CUDA) vs
  `apex.optimizers.FusedAdam(adam_w_mode=True)`, over `--params` billion fp32 parameters shaped
  like 7B blocks;
- RMSNorm forward + backward on [tokens, dim] bf16: `torch.nn.RMSNorm` eager, compiled (what
  `parallel.compile: true` gives each block), and `apex.normalization.FusedRMSNorm`.
Prints times and apex/torch ratios. Needs a CUDA GPU; apex rows are skipped where apex is not
importable (it is built from source on GPU clusters, never a dependency of this project).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Callable

import torch


def cuda_time(fn: Callable[[], None], warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def optimizer_rows(n_params: float, dim: int) -> dict[str, float]:
    shapes: list[tuple[int, ...]] = []
    while sum(math.prod(s) for s in shapes) < n_params * 1e9:
        shapes += [(dim, dim)] * 4 + [(dim * 11 // 4, dim)] * 3 + [(dim,)] * 2  # one Llama block's tensors
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = {"torch AdamW(fused=True)": cuda_time(torch.optim.AdamW(params, lr=1e-4, fused=True).step)}
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return rows
    rows["apex FusedAdam"] = cuda_time(FusedAdam(params, lr=1e-4, adam_w_mode=True).step)
    return rows


def norm_rows(tokens: int, dim: int) -> dict[str, float]:
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def fwd_bwd(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            module(x).backward(grad)
        return run

    torch_norm = torch.nn.RMSNorm(dim, device="cuda", dtype=torch.bfloat16)
    rows = {"torch nn.RMSNorm eager": cuda_time(fwd_bwd(torch_norm)),
            "torch nn.RMSNorm compiled": cuda_time(fwd_bwd(torch.compile(torch_norm)))}
    try:
        from apex.normalization import FusedRMSNorm
    except ImportError:
        return rows
    apex_norm = FusedRMSNorm(dim).to("cuda", torch.bfloat16)
    rows["apex FusedRMSNorm"] = cuda_time(fwd_bwd(apex_norm))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384, help="rows of the RMSNorm input (micro-batch x seq)")
    ap.add_argument("--params", type=float, default=0.5, help="billions of parameters for the optimizer step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: nothing measured (no figure is claimed for this machine)", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for title, rows in (("optimizer step", optimizer_rows(args.params, args.dim)),
                        ("RMSNorm fwd+bwd", norm_rows(args.tokens, args.dim))):
        base = next(iter(rows.values()))
        print(f"\n{title}")
        for name, ms in rows.items():
            print(f"  {name:28s} {ms:8.3f} ms   x{ms / base:.2f} of {next(iter(rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
