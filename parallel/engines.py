"""The engine registry: the `TrainingEngine` (parallel/engine.py) that `parallel.engine` names."""

from __future__ import annotations

import torch.nn as nn

from config import Config

from .dims import DistEnv
from .engine import OptimizerFactory, TrainingEngine


def build_engine(model: nn.Module, cfg: Config, env: DistEnv, optimizers: OptimizerFactory) -> TrainingEngine:
    """The engine `cfg.parallel.engine` names, over the plain `model` (built on meta when parallel.meta_init)."""
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, env, optimizers)
    from .torch_engine import TorchEngine

    return TorchEngine(model, cfg, env, optimizers)
