"""Data prefetching (`data.prefetch`): step time of the training loop with the loader's time hidden
behind the step, against building the batches inside it, measured side by side in one run.

    python benchmarks/prefetch.py [--steps 12] [--rounds 2] [--depth 2] [--device cpu]

The loader is the synthetic one with an injected delay (a sleep per micro-batch) chosen so that
building a step's batches takes about as long as the step itself (measured first). The real loop
(`trainer.train.train`) then runs with `data.prefetch=0` and `data.prefetch=<depth>`, alternating,
`--rounds` times each; per-step time is the loop's `step_s` (fetch + step), median over the steps
after the first two. Goal: ratio (prefetch / none) <= 0.6, i.e. about 0.5 when the loader is hidden.
A sleep releases the GIL like a loader waiting on I/O or in numpy/torch ops; a loader that holds the
GIL in Python code overlaps less.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import trainer.train as train_mod  # noqa: E402
from config import load_config  # noqa: E402
from trainer.data import build_loader  # noqa: E402


class DelayedLoader:
    """The real loader, `delay` seconds slower per batch."""

    def __init__(self, loader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def __iter__(self) -> "DelayedLoader":
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


@contextlib.contextmanager
def delayed_loader(delay: float):
    real = train_mod.build_loader
    train_mod.build_loader = lambda *a, **k: DelayedLoader(real(*a, **k), delay)
    try:
        yield
    finally:
        train_mod.build_loader = real


def step_seconds(cfg, engine, n: int) -> float:
    """Median time of the engine's step alone (batches built beforehand)."""
    loader = build_loader(cfg)
    times = []
    for step in range(n):
        batches = [next(loader) for _ in range(cfg.train.grad_accum)]
        t0 = time.perf_counter()
        engine.train_step(batches, step)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating")
    ap.add_argument("--depth", type=int, default=2, help="data.prefetch of the prefetching runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-accum", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="bench_prefetch_"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "data.source=synthetic", "logging.wandb=disabled", "logging.log_every=100000", "checkpoint.enabled=false",
        f"train.device={args.device}", "model.n_layers=2", "train.batch_size=2", "train.seq_len=128",
        "model.max_seq_len=128", f"train.grad_accum={args.grad_accum}", f"train.steps={args.steps}",
        f"train.output_dir={out}"])
    step_s = step_seconds(cfg, train_mod.make_engine(cfg), 8)
    delay = step_s / cfg.train.grad_accum
    print(f"step alone: {step_s * 1e3:.1f} ms; loader delay {delay * 1e3:.1f} ms per micro-batch "
          f"x {cfg.train.grad_accum} = {step_s * 1e3:.1f} ms per step ({args.device}, 1 thread)")
    results: dict[int, list[float]] = {0: [], args.depth: []}
    with delayed_loader(delay), contextlib.redirect_stdout(open("/dev/null", "w")):
        for _ in range(args.rounds):
            for depth in (0, args.depth):
                cfg.data.prefetch = depth
                results[depth] += [m["step_s"] for m in train_mod.train(cfg)[2:]]
    off, on = statistics.median(results[0]), statistics.median(results[args.depth])
    print(f"loop step time, data.prefetch=0: {off * 1e3:.1f} ms (median of {len(results[0])} steps)")
    print(f"loop step time, data.prefetch={args.depth}: {on * 1e3:.1f} ms (median of {len(results[args.depth])} steps)")
    print(f"ratio prefetch / none: {on / off:.3f} (goal <= 0.6; 0.5 = the loader fully hidden)")


if __name__ == "__main__":
    main()
