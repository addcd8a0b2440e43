"""Per-step metrics to stdout and to wandb (offline unless the user configured online)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .config import LoggingConfig


class MetricsLogger:
    """Prints one line per logged step and mirrors the numbers to a wandb run."""

    def __init__(self, cfg: LoggingConfig, output_dir: Path, config: dict[str, Any], enabled: bool = True) -> None:
        self.cfg, self.enabled, self.run = cfg, enabled, None
        if enabled and cfg.wandb != "disabled":
            import wandb

            output_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project, name=cfg.run_name, mode=cfg.wandb, dir=str(output_dir),
                config=config, settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            self.run.log(metrics, step=step)
        parts = [f"step {step:>6}"] + [_fmt(k, v) for k, v in metrics.items()]
        print(" | ".join(parts), file=sys.stdout, flush=True)

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
    if key.endswith("tokens_per_s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4f}"
