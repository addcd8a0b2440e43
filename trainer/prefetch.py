"""A training step's micro-batches, built ahead in a background thread (`data.prefetch` steps; 0: off).

`StepPrefetcher` wraps the loader: `next()` gives one step's `grad_accum` micro-batches, in exactly
the order the loader would give them without prefetching. With `depth > 0` a daemon thread builds
up to `depth` steps ahead into a bounded queue (pinning their memory for a CUDA device), and puts
with each step a deep copy of the loader's state taken right after that step's last micro-batch,
in the same thread and order. So `state_dict()` (what the CheckpointManager saves as the rank's
`loader`) is the position of what the loop has consumed, never of what was prefetched, and a resume
continues bitwise where an uninterrupted run would. An exception in the thread is re-raised in the
caller as the same object (a stream's ConfigError stays a one-line config error); `close()` stops
and joins the thread (the loop calls it on every exit: done, preemption, an exception).

The thread starts on the first `next()`, so the checkpoint manager loads a saved position into the
loader first (`load_state_dict` / `load_elastic_state` pass through, before the start only).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import logging
import queue
import threading
import time
import weakref
from typing import Any, Iterator

import torch

from model.batch import PackedBatch

from .data import ElasticResumeUnsupported

log = logging.getLogger("trainer")

THREAD_NAME = "trainer-prefetch"
_POLL_S = 0.05  # how often a blocked put/get looks at the stop flag or the thread's liveness
_JOIN_S = 10.0  # close() waits this long for a thread busy inside the loader (it is a daemon anyway)
_RUNNING: "weakref.WeakSet[StepPrefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop threads left running at interpreter exit: a daemon thread killed while inside torch's C++
    code during finalization aborts the process ("terminate called without an active exception")."""
    for prefetcher in list(_RUNNING):
        prefetcher.close()


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """`batch` on `device`; to a CUDA device with `non_blocking=True` (asynchronous from pinned memory)."""
    return batch.to(device, non_blocking=device.type == "cuda")


@dataclasses.dataclass
class _Failure:
    error: BaseException


class StepPrefetcher:
    """One step's micro-batches per `next()`, from `loader`, built `depth` steps ahead (0: in the call).

    Also a `Stateful` for the CheckpointManager, standing for the loader (see the module docstring).
    """

    def __init__(self, loader: Any, grad_accum: int, depth: int, pin_memory: bool = False) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.loader, self.grad_accum, self.depth, self.pin = loader, grad_accum, depth, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict | None = None  # the loader's state after the last consumed step (when started)
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[list[PackedBatch]]:
        return self

    def __next__(self) -> list[PackedBatch]:
        if self.depth == 0:
            return [next(self.loader) for _ in range(self.grad_accum)]
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("StepPrefetcher used after close()")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        item = self._get()
        if isinstance(item, _Failure):
            self._error = item.error
            self._join()
            raise item.error
        batches, self._state = item
        return batches

    # ---- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batches = [next(self.loader) for _ in range(self.grad_accum)]
                if self.pin:
                    batches = [b.pin_memory() for b in batches]
                state = copy.deepcopy(self.loader.state_dict())  # the position right after this step
                if not self._put((batches, state)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            self._put(_Failure(e))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch") from None

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread and drop what it prefetched; safe to call more than once."""
        self._stop.set()
        self._join()
        _RUNNING.discard(self)

    def _join(self) -> None:
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + _JOIN_S
        while thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # frees what it prefetched (pinned memory included)
            thread.join(timeout=_POLL_S)
        if thread.is_alive():
            log.warning("the data prefetch thread is still inside the loader after %.0fs; leaving it (a daemon "
                        "thread, it does not hold up the exit)", _JOIN_S)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> "StepPrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- Stateful (the CheckpointManager's rank state `loader`) -----------------------------------
    def state_dict(self) -> dict:
        """The loader's position after the last step handed out by `next()`."""
        if self.depth == 0 or self._thread is None:
            return self.loader.state_dict()
        assert self._state is not None  # the thread starts inside next(), which sets it
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._before_start("load_state_dict")
        self.loader.load_state_dict(state)

    def load_elastic_state(self, states: list[dict]) -> str:
        self._before_start("load_elastic_state")
        if not hasattr(self.loader, "load_elastic_state"):
            raise ElasticResumeUnsupported(f"{type(self.loader).__name__} has no load_elastic_state")
        return self.loader.load_elastic_state(states)

    def _before_start(self, what: str) -> None:
        if self._thread is not None:
            raise RuntimeError(f"StepPrefetcher.{what} after prefetching started")
