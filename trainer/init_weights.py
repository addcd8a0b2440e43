"""`checkpoint.init_from`: a run that starts from another model's weights only (a fine-tune), with a
fresh optimizer, LR schedule and data position.

Three sources, told apart by their files:
- a training checkpoint step folder: DCP reads its model tensors straight into this run's layout,
  whatever layout saved them (trusted-only: DCP's `.metadata` is a pickle); DeepSpeed partitions are
  consolidated first;
- an inference folder (`inference.convert`: config.json with "format": "transfusion" + safetensors);
- a Hugging Face Llama folder (config.json with "model_type": "llama" + safetensors): the text
  backbone (embeddings, blocks, final norm, LM head); the patch codecs and the timestep embedding,
  which Llama does not have, start fresh.
Every weight of the model comes from the source unless `checkpoint.init_fresh` (fnmatch patterns)
lets it start fresh; missing, unexpected and mis-shaped weights are one `ConfigError` line.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from config import Config, ConfigError, ModelConfig
from model import TransfusionModel
from model.llama_names import from_llama_state_dict, llama_names
from parallel.engine import DCP, DEEPSPEED, MODEL_KEY

from .checkpoint import warn_untrusted_once
from .checkpoint_weights import checkpoint_format, read_full_weights, safetensors_files, stored_shapes

CHECKPOINT, INFERENCE, HF_LLAMA = "training checkpoint", "inference folder", "Hugging Face Llama folder"


class WeightLoader(Protocol):
    """What an engine offers to take weights from elsewhere (the torch engine; config validation
    refuses init_from with DeepSpeed)."""

    def weight_names(self) -> set[str]: ...

    def load_weights(self, full: dict[str, torch.Tensor]) -> None: ...

    def load_checkpoint_weights(self, folder: Path, names: set[str]) -> None: ...


@dataclass
class WeightSource:
    """Where the weights come from, and {our name: shape} of what it holds (no tensor read yet)."""

    path: Path
    kind: str
    shapes: dict[str, tuple[int, ...]]
    foreign: list[str]  # source tensors with no counterpart in our model (always refused)
    fresh: tuple[str, ...] = ()  # weights this kind of source never has
    tensors: dict[str, torch.Tensor] | None = None  # DeepSpeed partitions, consolidated once
    dcp: bool = False  # a DCP checkpoint: DCP reads it into the engine's own shards

    def read(self, names: set[str], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Full tensors of `names` (our names), read from the safetensors files or DeepSpeed partitions."""
        if self.tensors is not None:
            return {k: v for k, v in self.tensors.items() if k in names}
        files = safetensors_files(self.path)
        if self.kind == HF_LLAMA:
            theirs = llama_names(cfg)
            hf = _read_safetensors(files, {theirs[n] for n in names})
            return {k: v for k, v in from_llama_state_dict(hf, cfg).items() if k in names}
        return _read_safetensors(files, names)


def _read_safetensors(files: dict[str, Path], names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted({files[n] for n in names}):
        with safe_open(path, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if n in names})
    return out


def open_source(path: Path, cfg: ModelConfig) -> WeightSource:
    """Tell what `path` is and list its tensors; one line when it is none of the three kinds."""
    fmt = checkpoint_format(path)
    if fmt == DCP:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        prefix = MODEL_KEY + "."
        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        shapes = {k[len(prefix):]: tuple(v.size) for k, v in meta.items()
                  if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
        return WeightSource(path, CHECKPOINT, shapes, [], dcp=True)
    if fmt == DEEPSPEED:
        full = read_full_weights(path)
        return WeightSource(path, CHECKPOINT, {k: tuple(v.shape) for k, v in full.items()}, [], tensors=full)
    config = path / "config.json"
    meta = json.loads(config.read_text()) if config.is_file() else {}
    if meta.get("format") == "transfusion":
        return WeightSource(path, INFERENCE, stored_shapes(safetensors_files(path)), [])
    if meta.get("model_type") == "llama":
        hf_shapes = stored_shapes(safetensors_files(path))
        names = llama_names(cfg)
        ours = {n: hf_shapes[h] for n, h in names.items() if h in hf_shapes}
        foreign = sorted(set(hf_shapes) - set(names.values()))
        fresh = tuple(n for n in _model_shapes(cfg) if n not in names)
        return WeightSource(path, HF_LLAMA, ours, foreign, fresh)
    raise ConfigError(f"checkpoint.init_from={path} is neither a training checkpoint step folder (train_state.pt + "
                      "DCP .metadata or deepspeed/), an inference folder (inference.convert) nor a Hugging Face "
                      "Llama folder (config.json with model_type llama + safetensors)")


def _model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in TransfusionModel(cfg).state_dict().items()}


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def weights_to_load(source: WeightSource, cfg: ModelConfig, allow_fresh: list[str]) -> tuple[set[str], list[str]]:
    """(names to read from the source, names that start fresh); refuses in one line any mismatch
    that `allow_fresh` (fnmatch patterns) does not cover."""
    model = _model_shapes(cfg)
    missing = [n for n in model if n not in source.shapes]
    wrong = [n for n in model if n in source.shapes and source.shapes[n] != model[n]]
    unexpected = sorted(set(source.shapes) - set(model)) + source.foreign
    refused = [n for n in missing + wrong
               if n not in source.fresh and not any(fnmatch.fnmatchcase(n, p) for p in allow_fresh)]
    if refused or unexpected:
        problems = []
        if bad := [n for n in missing if n in refused]:
            problems.append(f"missing {_names(bad)}")
        if unexpected:
            problems.append(f"unexpected {_names(unexpected)}")
        if bad := [f"{n} {list(source.shapes[n])} (model {list(model[n])})" for n in wrong if n in refused]:
            problems.append(f"wrong shape {_names(bad, 2)}")
        hint = " (another model.vocab_size or d_model?)" if "tok_embeddings.weight" in wrong else ""
        allow = f"; let them start fresh with checkpoint.init_fresh=[{', '.join(refused[:2])}, ...]" if refused else ""
        raise ConfigError(f"checkpoint.init_from={source.path} ({source.kind}) does not fit this model{hint}: "
                          f"{'; '.join(problems)}{allow}")
    fresh = sorted(missing + wrong)
    return set(model) - set(fresh), fresh


def init_from(engine: WeightLoader, cfg: Config) -> str:
    """Collective: load `checkpoint.init_from` into the engine's (freshly initialised) model; returns
    the line to log. Call only when the run did not resume a checkpoint of its own."""
    path = Path(cfg.checkpoint.init_from)
    source = open_source(path, cfg.model)
    names, fresh = weights_to_load(source, cfg.model, cfg.checkpoint.init_fresh)
    mine = engine.weight_names()
    if source.kind == CHECKPOINT:
        warn_untrusted_once(path)
    if source.dcp:
        engine.load_checkpoint_weights(path, names & mine)
    else:
        engine.load_weights(source.read(names & mine, cfg.model))
    kept = f"; {len(fresh)} start fresh ({_names(fresh, 3)})" if fresh else ""
    return f"initialised {len(names)} weights from {source.kind} {path}{kept}"
