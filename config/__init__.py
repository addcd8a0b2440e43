"""Typed configs for every part of the system (schemas; the values live in configs/*.yaml).

A neutral package (it imports nothing from the project): `model`, `parallel`, `trainer`, `data_prep` and `inference`
import their sections from here, so no package imports another just for its config.
"""

from .base import ConfigError, apply_overrides, from_dict, require, to_dict
from .data import DataConfig, DocumentRecipeConfig, StreamConfig, SyntheticDataConfig, check_stream_shards
from .evaluation import EvalConfig
from .job import Config, expand_env, load_config
from .model import AttentionBackend, DiffusionConfig, ModelConfig, SpecialTokens
from .parallel import DeepSpeedConfig, ParallelConfig
from .training import CheckpointConfig, LoggingConfig, OptimConfig, TrainSection

__all__ = [
    "ConfigError", "apply_overrides", "from_dict", "require", "to_dict",
    "DataConfig", "DocumentRecipeConfig", "StreamConfig", "SyntheticDataConfig", "check_stream_shards",
    "EvalConfig", "Config", "expand_env", "load_config",
    "AttentionBackend", "DiffusionConfig", "ModelConfig", "SpecialTokens",
    "DeepSpeedConfig", "ParallelConfig",
    "CheckpointConfig", "LoggingConfig", "OptimConfig", "TrainSection",
]
