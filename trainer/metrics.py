"""Per-step metrics to stdout, to `<output_dir>/metrics.jsonl` (full precision) and to wandb.

A logged line summarises the steps since the previous one (`window_summary`): mean losses and grad
norm, throughput over the window's wall time, the current lr and token count. With log_every 1 it
is the step itself.

wandb is offline unless the user configured online; a resumed run continues the same wandb run
(same id) and appends to the same metrics file, so step counts continue across restarts.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

from config import LoggingConfig
from .redact import redact


HISTORY_ROWS = 10_000  # rows MetricsLogger.history keeps (the latest steps; ~2 MB)
MEANS = ("loss", "lm_loss", "diffusion_loss", "grad_norm", "step_s")


def window_summary(rows: list[dict[str, float]], peak_flops: float | None = None) -> dict[str, float]:
    """One logged row for the per-step `rows` since the last log line (see the module docstring).

    Achieved model TFLOP/s over the window (model FLOPs as model/flops.py counts them, no
    recompute), and with `peak_flops` (all GPUs' dense bf16 peak) the MFU.
    """
    seconds = sum(r["step_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)
    out = {**{k: sum(r[k] for r in rows) / len(rows) for k in MEANS},
           "lr": rows[-1]["lr"], "tokens_per_s": tokens / seconds, "tokens_seen": rows[-1]["tokens_seen"]}
    if all("model_flops" in r for r in rows):
        achieved = sum(r["model_flops"] for r in rows) / seconds
        out["model_tflops_per_s"] = achieved / 1e12
        if peak_flops:
            out["mfu"] = achieved / peak_flops
    return out


class MetricsLogger:
    """Prints one line per logged step and mirrors the numbers to metrics.jsonl and wandb."""

    def __init__(
        self, cfg: LoggingConfig, output_dir: Path, config: dict[str, Any], enabled: bool = True,
        resume_id: str | None = None, peak_flops: float | None = None,
    ) -> None:
        self.cfg, self.enabled, self.run = cfg, enabled, None
        self.jsonl = output_dir / "metrics.jsonl"
        # The latest steps' rows (bounded: a long run must not grow host memory on every rank).
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_ROWS)
        self.peak_flops = peak_flops  # all GPUs' dense bf16 peak, for the MFU
        self._window: list[dict[str, float]] = []  # rows since the last log line
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb != "disabled":
            import wandb

            # No environment secret reaches wandb: the config is redacted by the caller, the run name
            # here, and wandb's system metadata (which records the command line) is not collected.
            self.run = wandb.init(
                project=cfg.project, name=redact(cfg.run_name), mode=cfg.wandb, dir=str(output_dir), config=config,
                id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True, x_disable_meta=True),
            )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            self.run.log(metrics, step=step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        parts = [f"step {step:>6}"] + [_fmt(k, v) for k, v in metrics.items()]
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def record(self, step: int, row: dict[str, float], last: bool = False) -> None:
        """Keep one step's row; every `log_every` steps (and at the `last`) log the window's summary."""
        self.history.append(row)
        self._window.append(row)
        if step % self.cfg.log_every == 0 or last:
            self.log(step, window_summary(self._window, self.peak_flops))
            self._window = []

    def event(self, message: str) -> None:
        """A one-off message (skipped step, preemption) for the log."""
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"lr {value:.2e}"
    if key.endswith(("tokens_per_s", "tokens_seen")):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4f}"
