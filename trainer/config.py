"""The run config: every section typed, loaded from YAML with `key.sub=value` overrides, validated."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import DiffusionConfig, ModelConfig
from model.config_base import ConfigError, apply_overrides, from_dict, require, to_dict


@dataclass
class TrainSection:
    steps: int = 250_000
    seq_len: int = 4096
    batch_size: int = 1  # rows per micro-batch (per data-parallel rank)
    grad_accum: int = 1
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "bf16"  # bf16 = autocast with fp32 master weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "outputs/run"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 4000
    decay_steps: int | None = None  # cosine reaches min_lr here; None = train.steps
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class SyntheticDataConfig:
    """A built-in, learnable document source (class-conditional images, Markov-chain text)."""

    num_classes: int = 10
    text_len_min: int = 16
    text_len_max: int = 96
    image_noise: float = 0.1


@dataclass
class StreamConfig:
    """One set of MDS shards written by data_prep/, or a Megatron-LM indexed dataset (kind: megatron)."""

    path: str  # local shard folder (with `remote`: the local cache folder); megatron: the .bin/.idx prefix
    kind: Literal["image", "text", "megatron", "image_tokens"]  # image_tokens: VQ codes (image_representation=tokens)
    proportion: float = 1.0  # share of sequence positions (tokens) drawn from this stream
    remote: str | None = None  # object-store URL of the shards, streamed into `path` (not for megatron)
    # kind: megatron only (trainer/megatron_corpus.py):
    tokenizer: str | None = None  # what the corpus was tokenized with; recorded in the checkpoint's config
    add_bos: bool = True  # prepend BOS to each document
    add_eos: bool = False  # append EOS: for corpora made without preprocess_data.py --append-eod


@dataclass
class DataConfig:
    source: Literal["synthetic", "streaming"] = "synthetic"
    streams: list[StreamConfig] = field(default_factory=list)  # for source: streaming
    shuffle: bool = True
    shuffle_block: int = 1 << 16  # streaming: samples are shuffled within blocks of this many positions
    max_caption_tokens: int = 128  # longer captions are cut
    sample_latents: bool = True  # draw each latent from the stored posterior (else use its mean)
    text_fraction: float = 0.5  # synthetic source: share of documents that are text-only
    image_first_prob: float = 0.2
    caption_dropout: float = 0.1
    image_first_max_t: int = 500
    max_waiting_images: int = 4  # image documents the packer may hold back before padding a row
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO engine (pure data parallel); a user JSON may override the generated config."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    config_json: str | None = None


@dataclass
class ParallelConfig:
    """Device mesh dims (their product must equal the number of processes) and how to apply them."""

    dp_replicate: int = 1
    dp_shard: int = 1  # -1 = whatever the world size leaves after the other dims
    tp: int = 1
    pp: int = 1
    engine: Literal["torch", "deepspeed"] = "torch"
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_virtual_stages: int = 2  # stages per rank for the interleaved / zero-bubble schedules
    reshard_after_forward: bool = True  # True: ZeRO-3; False: ZeRO-2-like
    cpu_offload: bool = False
    activation_checkpoint: Literal["none", "full", "every_k"] = "none"
    activation_checkpoint_every: int = 2
    compile: bool = False
    meta_init: bool = False  # build the model on the meta device, materialise only local shards
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def resolved(self, world_size: int) -> "ParallelConfig":
        """Concrete dims for `world_size` processes (fills dp_shard=-1); errors name the mismatch."""
        others = self.dp_replicate * self.tp * self.pp
        shard = self.dp_shard
        if shard == -1:
            require(
                world_size % others == 0,
                f"world size {world_size} is not divisible by dp_replicate*tp*pp={others}",
            )
            shard = world_size // others
        dims = dataclasses.replace(self, dp_shard=shard)
        require(
            others * shard == world_size,
            f"world size {world_size} != dp_replicate*dp_shard*tp*pp = "
            f"{self.dp_replicate}*{shard}*{self.tp}*{self.pp}",
        )
        return dims


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps between saves; 0 = only at the end
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    enabled: bool = True
    resume: str = "auto"  # auto (latest in <output_dir>/checkpoints, if any) | none | a checkpoint path
    async_save: bool = False  # overlap the write with training (DCP async_save)
    max_bad_steps: int = 5  # consecutive non-finite steps (skipped) before saving and stopping; deepspeed stops at 1


@dataclass
class LoggingConfig:
    log_every: int = 1
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "transfusion"
    run_name: str | None = None


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
        require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
        require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}]")
        require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two values in [0, 1), got {o.betas}")
        require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
        for name in ("text_fraction", "image_first_prob", "caption_dropout"):
            v = getattr(d, name)
            require(0 <= v <= 1, f"data.{name} must lie in [0, 1], got {v}")
        require(d.source == "streaming" or m.image_representation == "latent", "model.image_representation=tokens "
                "reads images from image_tokens shards: set data.source=streaming with a stream of kind image_tokens")
        if d.source == "streaming":
            require(bool(d.streams), "data.source=streaming needs at least one entry in data.streams")
            for i, st in enumerate(d.streams):
                require(st.proportion > 0, f"data.streams[{i}].proportion must be positive, got {st.proportion}")
                want = {"image": "latent", "image_tokens": "tokens"}.get(st.kind, m.image_representation)
                require(want == m.image_representation, f"data.streams[{i}] is a {st.kind} stream, which needs "
                        f"model.image_representation={want} (got {m.image_representation})")
                if st.kind == "megatron":
                    require(bool(st.tokenizer), f"data.streams[{i}].tokenizer: name what the Megatron corpus "
                            f"'{st.path}' was tokenized with (e.g. the tokenizer model's path), so runs record it")
                    require(st.remote is None, f"data.streams[{i}]: Megatron corpora are read in place, not "
                            "streamed (remote); convert it with `python -m data_prep.megatron_convert to-mds`")
            require(
                d.max_caption_tokens + m.patches_per_image + 4 <= t.seq_len,
                f"an image document (data.max_caption_tokens={d.max_caption_tokens} + "
                f"{m.patches_per_image} patches + 4 special tokens) does not fit train.seq_len={t.seq_len}",
            )
        require(
            0 < d.image_first_max_t <= self.diffusion.num_timesteps,
            f"data.image_first_max_t={d.image_first_max_t} must lie in (0, diffusion.num_timesteps]",
        )
        for name in ("dp_replicate", "tp", "pp"):
            require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        require(p.dp_shard >= 1 or p.dp_shard == -1, f"parallel.dp_shard must be >= 1 or -1, got {p.dp_shard}")
        require(m.n_heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}")
        require(m.kv_heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.n_kv_heads={m.kv_heads}")
        require(m.vocab_size % p.tp == 0, f"parallel.tp={p.tp} does not divide model.vocab_size={m.vocab_size}")
        require(t.seq_len % p.tp == 0, f"parallel.tp={p.tp} does not divide train.seq_len={t.seq_len} (sequence parallel)")
        multi = p.pp_schedule in ("interleaved_1f1b", "zero_bubble")
        n_stages = p.pp * (p.pp_virtual_stages if multi and p.pp > 1 else 1)
        require(
            n_stages <= m.n_layers,
            f"parallel.pp={p.pp} x {n_stages // p.pp} stages per rank exceeds model.n_layers={m.n_layers}",
        )
        if p.pp > 1:
            require(
                t.grad_accum >= p.pp and (not multi or t.grad_accum % p.pp == 0),
                f"parallel.pp={p.pp} needs train.grad_accum (the pipeline's micro-batches) >= {p.pp}"
                + (f" and a multiple of {p.pp}" if multi else "") + f", got {t.grad_accum}",
            )
        if p.engine == "deepspeed":
            require(
                p.tp == 1 and p.pp == 1,
                f"parallel.engine=deepspeed runs ZeRO data parallelism only, which does not compose with "
                f"tensor or pipeline parallelism; set parallel.tp=1 and parallel.pp=1 (got tp={p.tp}, "
                f"pp={p.pp}) or use parallel.engine=torch",
            )
        require(p.activation_checkpoint_every >= 1, "parallel.activation_checkpoint_every must be >= 1")
        require(
            p.engine != "deepspeed" or not self.checkpoint.async_save,
            "checkpoint.async_save overlaps DCP writes of parallel.engine=torch; DeepSpeed writes its "
            "partitions synchronously: set checkpoint.async_save=false",
        )
        require(self.data.shuffle_block >= 1, "data.shuffle_block must be >= 1")
        require(self.logging.log_every >= 1, "logging.log_every must be >= 1")
        require(self.checkpoint.interval >= 0, "checkpoint.interval must be >= 0")
        require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        require(self.checkpoint.keep_every >= 0, "checkpoint.keep_every must be >= 0")
        require(self.checkpoint.max_bad_steps >= 1, "checkpoint.max_bad_steps must be >= 1")
        if d.source == "streaming":  # last: a config with a typo fails on the typo, not on the data
            check_stream_shards(d)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    def to_dict(self) -> dict:
        return to_dict(self)


# How each kind of stream is prepared (named in the error when its shards are missing).
PREPARE_COMMAND = {
    "image": "python -m data_prep.encode_latents --input IMAGES --out {out} --vae VAE_DIR --tokenizer TOKENIZER.model",
    "text": "python -m data_prep.tokenize_text --input CORPUS --out {out} --tokenizer TOKENIZER.model",
    "image_tokens": "python -m data_prep.encode_vq_tokens --input IMAGES --out {out} --vq VQ_DIR --tokenizer TOKENIZER.model",
}


def check_stream_shards(data: DataConfig) -> None:
    """Refuse local streams whose shard index is missing, before a model or GPU is touched.

    Remote streams (`remote:` set) are not checked: that would need the network, and `path` is
    only their cache folder.
    """
    for i, st in enumerate(data.streams):
        if st.remote is not None:
            continue
        if st.kind == "megatron":
            missing = [f"{st.path}{ext}" for ext in (".bin", ".idx") if not Path(f"{st.path}{ext}").is_file()]
            if missing:
                raise ConfigError(f"data.streams[{i}] (Megatron corpus): {' and '.join(missing)} missing; "
                                  "`path` is the prefix given to Megatron-LM's --data-path")
            continue
        root = Path(st.path)
        index = root / "index.json"
        if index.is_file():
            continue
        if root.is_dir() and any(root.glob("part-*")):
            hint = f"merge the workers' parts with `python -m data_prep.merge_index {root}`"
        else:
            hint = f"prepare it with `{PREPARE_COMMAND[st.kind].format(out=root)}`"
        raise ConfigError(
            f"data.streams[{i}] ({st.kind} stream) has no shards: {index.absolute()} does not exist; "
            f"{hint}, or fix the path"
        )


_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(data: dict[str, Any], label: str) -> dict[str, Any]:
    """Replace `${VAR}` in every string value with the environment variable's value.

    Where clusters keep data differs per site, so configs say e.g. `path: ${DATA_ROOT}/images`.
    An unset (or empty) variable is a one-line ConfigError naming `label` (the config file), the
    key and the variable. `data.streams` is left as written unless data.source is streaming, so
    `data.source=synthetic` runs without the variables of the shard paths.
    """
    section = data.get("data")
    source = section.get("source", DataConfig.source) if isinstance(section, dict) else DataConfig.source

    def expand(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                sub = f"{key}.{k}" if key else str(k)
                out[k] = v if sub == "data.streams" and source != "streaming" else expand(v, sub)
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
    if key.startswith("data.streams"):
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
