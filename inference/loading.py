"""The consolidated inference folder: its format, and loading it without the training stack.

A folder written by `inference.convert` holds
  config.json                      {"format": "transfusion", "model": ..., "diffusion": ..., "dtype": ...,
                                    "tokenizer": "tokenizer.model" | null, "vae": "vae" | "../path" | null}
  model.safetensors                (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
  tokenizer.model                  (optional, sentencepiece)
  vae/                             (optional, diffusers AutoencoderKL save_pretrained folder; or referenced)
  vq/                              (model.image_representation=tokens: the diffusers VQModel that turns
                                    images into the codes the model reads and writes; "vq" in config.json)
Tensor names are the plain TransfusionModel's state-dict names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from config import ConfigError, DiffusionConfig, ModelConfig, from_dict, to_dict
from model.transfusion import TransfusionModel
from trainer.checkpoint_weights import safetensors_files, stored_shapes

FORMAT = "transfusion"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"
VAE_DIR = "vae"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class InferenceFolderError(RuntimeError):
    """A checkpoint or inference folder that is missing, incomplete or inconsistent; says what to fix."""


@dataclass
class InferenceConfig:
    """What config.json holds: the model and diffusion configs plus the folder's companions."""

    model: ModelConfig
    diffusion: DiffusionConfig
    dtype: str = "fp32"  # dtype of the stored weights
    tokenizer: str | None = None  # path relative to the folder
    vae: str | None = None  # path relative to the folder (a copy or a reference)
    vq: str | None = None  # tokens representation: the VQModel folder, relative like `vae`
    source: dict[str, Any] = field(default_factory=dict)  # where the weights came from
    folder: Path | None = None  # set when read from disk

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(self.model),
            "diffusion": to_dict(self.diffusion), "dtype": self.dtype, "tokenizer": self.tokenizer,
            "vae": self.vae, "vq": self.vq, "source": self.source,
        }

    def resolve(self, relative: str | None) -> Path | None:
        """A companion path from config.json, relative to the folder."""
        if relative is None:
            return None
        p = Path(relative)
        return p if p.is_absolute() or self.folder is None else (self.folder / p).resolve()


def write_config(folder: Path, cfg: InferenceConfig) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def read_config(folder: str | Path) -> InferenceConfig:
    """Parse folder/config.json; errors name the folder and the bad key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceFolderError(
            f"inference folder '{folder}' does not exist; create one with "
            f"`python -m inference.convert CKPT_DIR {folder}`"
        )
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise InferenceFolderError(
            f"'{folder}' has no {CONFIG_NAME}: it is not an inference folder (convert a training "
            f"checkpoint with `python -m inference.convert CKPT_DIR OUT_DIR`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InferenceFolderError(f"{path} is not valid JSON: {e}") from None
    if data.get("format") != FORMAT:
        raise InferenceFolderError(f"{path} is not a Transfusion inference config (format={data.get('format')!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise InferenceFolderError(f"{path} has format_version {data['format_version']}; this code reads <= {FORMAT_VERSION}")
    if not isinstance(data.get("model"), dict):
        raise InferenceFolderError(f"{path} has no 'model' section")
    if data.get("dtype") not in DTYPES:
        raise InferenceFolderError(f"{path}: dtype {data.get('dtype')!r} is not one of {sorted(DTYPES)}")
    try:
        model = from_dict(ModelConfig, data.get("model"), prefix="model")
        model.validate()
        diffusion = from_dict(DiffusionConfig, data.get("diffusion"), prefix="diffusion")
        diffusion.validate()
    except ConfigError as e:
        raise InferenceFolderError(f"{path}: {e}") from None
    return InferenceConfig(
        model, diffusion, data["dtype"], data.get("tokenizer"), data.get("vae"), data.get("vq"),
        data.get("source", {}), folder=folder.resolve(),
    )


def save_weights(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[str]:
    """Write model.safetensors, or HF-style shards + index above `max_shard_size`; returns the files."""
    save_torch_state_dict(
        state_dict, folder, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )
    return sorted(p.name for p in folder.glob("model*.safetensors"))


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when the weights are sharded."""
    try:
        return safetensors_files(folder)
    except ConfigError as e:
        raise InferenceFolderError(f"{e}; the conversion did not finish") from None


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_tensors(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str, cfg: ModelConfig
) -> None:
    """Raise InferenceFolderError naming missing, unexpected and mis-shaped tensors (with a hint)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n} {list(found[n])} (config implies {list(expected[n])})"
             for n in sorted(expected) if n in found and tuple(found[n]) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where} does not match the model its config describes:"]
    if missing:
        lines.append(f"  missing {len(missing)} tensors: {_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} tensors: {_names(unexpected)}")
    if wrong:
        lines.append(f"  wrong shape: {_names(wrong, 4)}")
    layers = {int(m.group(1)) for n in found if (m := re.match(r"layers\.(\d+)\.", n))}
    if layers and len(layers) != cfg.n_layers:
        lines.append(f"  the weights have {len(layers)} layers but the config says model.n_layers={cfg.n_layers}")
    emb = found.get("tok_embeddings.weight")
    if emb is not None and tuple(emb) != (cfg.vocab_size, cfg.d_model):
        lines.append(f"  the embedding is {list(emb)} but the config says vocab_size={cfg.vocab_size}, d_model={cfg.d_model}")
    raise InferenceFolderError("\n".join(lines))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of a TransfusionModel for `cfg` (built on the meta device)."""
    with torch.device("meta"):
        model = TransfusionModel(cfg)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def load_inference_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
    load_tokenizer: bool = True, load_vae: bool = True,
) -> tuple[TransfusionModel, InferenceConfig, Any, Any]:
    """Load (model in eval mode, config, tokenizer or None, image autoencoder or None) from an inference folder.

    The image autoencoder is the VAE, or with `model.image_representation: tokens` the VQModel.

    dtype None keeps the stored dtype ('fp32'/'bf16' or a torch dtype otherwise). The model is built
    on the meta device and takes the stored tensors directly, so no random init is paid for.
    """
    cfg = read_config(folder)
    folder = cfg.folder
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype, got {dtype!r}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or DTYPES[cfg.dtype])
    files = weight_files(folder)
    check_tensors(expected_shapes(cfg.model), stored_shapes(files), f"the weights in '{folder}'", cfg.model)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        state.update(load_file(path, device=str(device)))
    state = {n: t.to(torch_dtype) if t.is_floating_point() else t for n, t in state.items()}
    with torch.device("meta"):
        model = TransfusionModel(cfg.model)
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InferenceFolderError(f"tensors not provided by the weights (still on meta): {_names(left)}")
    model.eval().requires_grad_(False)
    tokenizer = vae = None
    if load_tokenizer and cfg.tokenizer is not None:
        from .tokenizer import TextTokenizer

        tokenizer = TextTokenizer(_companion(cfg, cfg.tokenizer, "tokenizer"), cfg.model)
    if load_vae and cfg.model.image_representation == "tokens":
        if cfg.vq is not None:
            from model.vq import VQError, check_vq, load_vq

            path = _companion(cfg, cfg.vq, "VQ model")
            vae = load_vq(path, device)
            try:
                check_vq(vae, cfg.model.latent_size, cfg.model.image_codebook_size, str(path))
            except VQError as e:
                raise InferenceFolderError(str(e)) from None
    elif load_vae and cfg.vae is not None:
        from .images import load_vae

        vae = load_vae(_companion(cfg, cfg.vae, "VAE"), cfg.model, device)
    return model, cfg, tokenizer, vae


def _companion(cfg: InferenceConfig, relative: str, what: str) -> Path:
    path = cfg.resolve(relative)
    assert path is not None
    if not path.exists():
        raise InferenceFolderError(
            f"config.json in '{cfg.folder}' points to a {what} at '{relative}' ({path}), which does not exist"
        )
    return path
