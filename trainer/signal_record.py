"""Stop signals recorded from a trainer's first moment, before its slow imports and set-up.

SLURM sends its timed signal once (`--signal=USR1@T`), and at 7B a trainer spends minutes importing,
building the model and loading a checkpoint before its loop starts. `install()` runs first thing in
`python -m trainer.train`; PreemptionWatcher (trainer/preemption.py) takes over what it recorded.
The node launcher (slurm/launch_node.sh) also writes each signal it gets to $TRANSFUSION_SIGNAL_FILE:
that covers a signal sent while torchrun was starting, before any trainer existed.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

__all__ = ["SIGNAL_FILE_ENV", "STOP_SIGNALS", "install", "take"]

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
SIGNAL_FILE_ENV = "TRANSFUSION_SIGNAL_FILE"
_received: list[signal.Signals] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signal.Signals(signum))


def install() -> None:
    """Record SIGUSR1/SIGTERM from now on (they would otherwise kill or, inherited as ignored, be lost)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def take() -> list[signal.Signals]:
    """The stop signals recorded so far, here and by the node launcher; this process's record is cleared."""
    got = _received[:]
    _received.clear()
    path = os.environ.get(SIGNAL_FILE_ENV)
    if path and os.path.exists(path):
        with open(path) as f:
            names = f.read().split()
        got += [signal.Signals[f"SIG{n}"] for n in names if f"SIG{n}" in signal.Signals.__members__]
    return got
