"""Preemption and divergence: signal-driven save-and-exit, and the exceptions the loop raises.

SLURM sends SIGUSR1 (`--signal=USR1@T`) before the time limit and SIGTERM on preemption. The
handler only records the signal; the loop finishes its step, saves, writes the REQUEUE marker
(<output_dir>/REQUEUE, which slurm/pretrain_7b.sh turns into `scontrol requeue`) and exits with
`process_exit_code()`. Ranks agree on the decision with one all-reduce per step, since a signal
may reach only some of them. The handler replaces whatever disposition the process inherited,
SIG_IGN included (slurm/launch_node.sh starts torchrun with USR1 ignored).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["REQUEUE_EXIT_CODE", "Preempted", "PreemptionWatcher", "TrainingDiverged", "process_exit_code"]

REQUEUE_EXIT_CODE = 42


def process_exit_code(exit_code: int = REQUEUE_EXIT_CODE) -> int:
    """The exit code of a trainer that saved for a requeue: 0 under torchrun, else `exit_code`.

    torchrun's agent takes any other code for a crash: it stops the other ranks while they may still
    be finishing their exit and prints a failure traceback. The REQUEUE marker carries the decision.
    """
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else exit_code


class TrainingDiverged(RuntimeError):
    """Non-finite losses or weights that training cannot recover from by itself."""


class Preempted(Exception):
    """Raised after the checkpoint is written; carries the process exit code (see process_exit_code)."""

    def __init__(self, exit_code: int = REQUEUE_EXIT_CODE) -> None:
        self.exit_code = process_exit_code(exit_code)
        super().__init__(f"preempted (exit {self.exit_code})")


class PreemptionWatcher:
    """Records SIGUSR1/SIGTERM; `requested()` is True on every rank once any rank got one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
