"""Preemption, cancellation and divergence: signal-driven save-and-exit, and the exceptions the loop raises.

Two signals stop a run, and they mean different things (slurm/pretrain_7b.sh):
- SIGUSR1, the timed signal the batch script asks for (`--signal=USR1@T`) or `scancel --signal=USR1`:
  a preemption. The loop finishes its step, saves, writes the REQUEUE marker (<output_dir>/REQUEUE,
  which the batch script turns into `scontrol requeue`) and exits.
- SIGTERM, what `scancel`, the time limit and SLURM's own preemption (PreemptMode=REQUEUE/CANCEL with
  GraceTime) send: a stop. The loop finishes its step and saves, but writes no marker: cancel means
  cancel, and where the cluster preempts with TERM, SLURM requeues the job itself.
Handlers only record; ranks agree with one all-reduce per step, since a signal may reach only some
of them, and TERM wins over USR1. Signals recorded before the loop (trainer/signal_record.py) count.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

from .signal_record import STOP_SIGNALS, take

__all__ = ["REQUEUE_EXIT_CODE", "STOP_EXIT_CODE", "Preempted", "PreemptionWatcher", "TrainingDiverged",
           "process_exit_code"]

REQUEUE_EXIT_CODE = 42
STOP_EXIT_CODE = 128 + signal.SIGTERM  # saved on SIGTERM: what a shell reports for a TERM-ended process
_PRIORITY = (None, signal.SIGUSR1, signal.SIGTERM)  # the all-reduce takes the strongest


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
    """Records SIGUSR1/SIGTERM from its creation on, plus those recorded before (signal_record.take).

    `requested()` gives every rank the strongest signal any rank got: SIGTERM, SIGUSR1 or None.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        for sig in take():
            self._note(sig)
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass

    def _note(self, sig: signal.Signals) -> None:
        if _PRIORITY.index(sig) > _PRIORITY.index(self.received):
            self.received = sig

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._note(signal.Signals(signum))

    def requested(self) -> signal.Signals | None:
        flag = torch.tensor([float(_PRIORITY.index(self.received))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return _PRIORITY[int(flag.item())]

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
