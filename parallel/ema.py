"""An exponential moving average of the weights (`train.ema_decay`), kept exactly as the parameters are.

Each EMA tensor is an fp32 copy of this rank's parameter as the layout holds it: a DTensor shard
under FSDP2 / TP (so nothing is ever gathered, on any rank), a pipeline rank's own stages only. After
every applied optimizer step `ema = decay * ema + (1 - decay) * param`, elementwise on the local
shards. It is saved with the engine's checkpoint state under the plain parameter names (DCP
reshards it to any layout) and can stand in for the weights while a held-out evaluation runs
(`swapped`): parameters and EMA exchange values tensor by tensor, so the extra memory is one tensor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from model.init import local_tensor


class EmaWeights:
    """fp32 EMA of `params` (name -> parameter), updated in place (see the module docstring)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.params = decay, params
        with torch.no_grad():
            self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in params.items()}

    def _locals(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA, parameter) local shards, in the same order: the arithmetic is elementwise on them."""
        names = list(self.params)
        return [local_tensor(self.shadow[n]) for n in names], [local_tensor(self.params[n].detach()) for n in names]

    @torch.no_grad()
    def update(self) -> None:
        """ema += (1 - decay) * (param - ema), for every tensor (after an applied optimizer step)."""
        shadow, params = self._locals()
        torch._foreach_lerp_(shadow, [p.float() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (a resumed run that had no EMA)."""
        for e, p in zip(*self._locals()):
            e.copy_(p)

    @torch.no_grad()
    def _exchange(self) -> None:
        for e, p in zip(*self._locals()):
            kept = p.clone()
            p.copy_(e)
            e.copy_(kept)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA values in the parameters (cast to their dtype) inside the block, restored after."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow
