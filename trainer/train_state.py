"""The trainer's own checkpointed state as Stateful objects: its counters and the LR schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class TrainState:
    """Counters of the loop: the top-level fields of a checkpoint's train_state.pt."""

    step: int = 0  # optimizer steps applied
    tokens_seen: int = 0  # over all data-parallel ranks
    bad_steps: int = 0  # consecutive skipped (non-finite) steps
    wandb_id: str | None = None  # the run a resume continues

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.wandb_id = state.get("wandb_id")


class ScheduleState:
    """The LR schedule; a load also sets the optimizer's current lr, which an engine's own optimizer
    load (DeepSpeed's) does not."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
