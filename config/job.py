"""The run config: every section typed, loaded from YAML with `key.sub=value` overrides, validated."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base import ConfigError, apply_overrides, from_dict, require, to_dict
from .data import DataConfig, check_stream_shards
from .evaluation import EvalConfig
from .model import DiffusionConfig, ModelConfig
from .parallel import ParallelConfig
from .training import CheckpointConfig, LoggingConfig, OptimConfig, TrainSection

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        self.model.validate()
        self.diffusion.validate()
        m, t, o, d, p = self.model, self.train, self.optim, self.data, self.parallel
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            require(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
        require(
            t.seq_len <= m.max_seq_len,
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
        )
        require(
            m.patches_per_image + 4 <= t.seq_len,
            f"an image takes {m.patches_per_image} patches + BOI/EOI, which does not fit "
            f"train.seq_len={t.seq_len} with its BOS/EOS",
        )
        require(0 <= t.ema_decay < 1, f"train.ema_decay must lie in [0, 1) (0: no EMA), got {t.ema_decay}")
        require(self.eval.weights == "raw" or t.ema_decay > 0, f"eval.weights={self.eval.weights} scores the EMA "
                "weights, which train.ema_decay=0 does not keep: set train.ema_decay (e.g. 0.9999) or eval.weights=raw")
        require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
        require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}]")
        require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two values in [0, 1), got {o.betas}")
        require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
        d.validate(m, t.seq_len, self.diffusion.num_timesteps)
        p.validate(m, t.seq_len, t.grad_accum)
        require(
            p.engine != "deepspeed" or not self.checkpoint.async_save,
            "checkpoint.async_save overlaps DCP writes of parallel.engine=torch; DeepSpeed writes its "
            "partitions synchronously: set checkpoint.async_save=false",
        )
        require(
            p.engine != "deepspeed" or not self.checkpoint.init_from,
            "checkpoint.init_from loads weights into parallel.engine=torch layouts only so far; fine-tune with "
            "the torch engine (any FSDP/TP/PP layout)",
        )
        require(self.checkpoint.init_from is None or Path(self.checkpoint.init_from).exists(),
                f"checkpoint.init_from={self.checkpoint.init_from} does not exist")
        require(self.logging.log_every >= 1, "logging.log_every must be >= 1")
        require(self.checkpoint.interval >= 0, "checkpoint.interval must be >= 0")
        require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        require(self.checkpoint.keep_every >= 0, "checkpoint.keep_every must be >= 0")
        require(self.checkpoint.max_bad_steps >= 1, "checkpoint.max_bad_steps must be >= 1")
        self.eval.validate(d, m, self.diffusion.num_timesteps)
        if d.source == "streaming":  # last: a config with a typo fails on the typo, not on the data
            check_stream_shards(d.streams, prepare=d.prepare)
            if self.eval.enabled:
                check_stream_shards(self.eval.streams, "eval.streams", d.prepare)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    def to_dict(self) -> dict:
        return to_dict(self)


_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(data: dict[str, Any], label: str) -> dict[str, Any]:
    """Replace `${VAR}` in every string value with the environment variable's value.

    Where clusters keep data differs per site, so configs say e.g. `path: ${DATA_ROOT}/images`.
    An unset (or empty) variable is a one-line ConfigError naming `label` (the config file), the
    key and the variable. Streams that are not read are left as written: `data.streams` and
    `eval.streams` unless data.source is streaming, `eval.streams` also with eval.every=0, so
    `data.source=synthetic` runs without the variables of the shard paths.
    """
    section, evaluation = data.get("data"), data.get("eval")
    source = section.get("source", DataConfig.source) if isinstance(section, dict) else DataConfig.source
    every = evaluation.get("every", EvalConfig.every) if isinstance(evaluation, dict) else EvalConfig.every
    unread = {"data.streams"} if source != "streaming" else set()
    if source != "streaming" or (isinstance(every, int) and every <= 0):
        unread.add("eval.streams")

    def expand(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                sub = f"{key}.{k}" if key else str(k)
                out[k] = v if sub in unread else expand(v, sub)
            return out
        if isinstance(node, list):
            return [expand(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            return _ENV_REF.sub(lambda m: _env_value(m.group(1), key, label), node)
        return node

    return expand(data, "")


def _env_value(name: str, key: str, label: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ConfigError(f"{label}: {key} has '${{{name}}}', which is not a ${{NAME}} environment variable reference")
    value = os.environ.get(name, "")
    if value:
        return value
    state = "is empty" if name in os.environ else "is not set"
    if key.startswith(("data.streams", "eval.streams")):
        hint = f"export {name}=/path/to/shards (see slurm/pretrain_7b.sh)"
    else:
        hint = f"export {name}=... or override {key}=..."
    raise ConfigError(f"{label}: {key} uses ${{{name}}}, which {state}; {hint}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply overrides, expand `${VAR}`s, build and validate it
    (including that the data it names exists)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    data = expand_env(data, str(path) if path is not None else "overrides")
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg
