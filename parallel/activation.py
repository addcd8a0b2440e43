"""Activation checkpointing (none / full / every k-th block) and per-block torch.compile."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    """Recompute block activations in backward: all blocks ('full') or every `every`-th one."""
    if mode == "none":
        return
    for i, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (keeps parameter names, unlike wrapping in torch.compile)."""
    for block in model.layers.values():
        block.compile()
