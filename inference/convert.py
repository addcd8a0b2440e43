"""Training checkpoint -> consolidated inference folder: `python -m inference.convert CKPT_DIR OUT_DIR`.

The weights are read by the offline checkpoint reader (`trainer.checkpoint_weights.read_full_weights`:
DCP reshards into full tensors, so checkpoints saved by any torch layout give the same folder;
DeepSpeed partition files are consolidated by zero_to_fp32) and checked against the model config
in train_state.pt. See inference/loading.py for the folder format.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from config import ConfigError, DiffusionConfig, ModelConfig, from_dict
from model.vq import VQError, check_vq, load_vq
from trainer.checkpoint_files import (
    MANIFEST, TRUST_WARNING, CheckpointDamaged, PickledCheckpointFile, load_plain, verify_folder,
)
from trainer.checkpoint_weights import DEEPSPEED, checkpoint_format, read_full_weights

from .hf_llama import export_hf_llama
from .images import VAEError, load_vae
from .loading import (
    DTYPES, TOKENIZER_NAME, VAE_DIR, InferenceConfig, InferenceFolderError, check_tensors, expected_shapes,
    save_weights, write_config,
)
from .tokenizer import TextTokenizer, TokenizerError

VQ_DIR = "vq"
def _is_checkpoint(p: Path) -> bool:
    # A DCP folder without train_state.pt still counts, so the error names the missing config.
    return (p / ".metadata").is_file() or checkpoint_format(p) is not None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder (DCP `.metadata` or DeepSpeed `deepspeed/`); a run's `checkpoints/` root or output
    dir picks the latest."""
    p = Path(path)
    if not p.exists():
        raise InferenceFolderError(f"checkpoint folder '{p}' does not exist")
    if _is_checkpoint(p):
        return p
    for root in (p, p / "checkpoints"):
        steps = sorted(d for d in root.glob("step_*") if _is_checkpoint(d)) if root.is_dir() else []
        if steps:
            return steps[-1]
    raise InferenceFolderError(
        f"'{p}' is not a checkpoint (no DCP .metadata or {DEEPSPEED}/ folder) and holds no complete step_N "
        f"checkpoints; pass a step folder such as <output_dir>/checkpoints/step_00000300"
    )


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against the checkpoint's manifest (older checkpoints without one: a warning)."""
    if not (ckpt / MANIFEST).is_file():
        print(f"warning: {ckpt} has no {MANIFEST} (an older checkpoint): its files are not verified", file=sys.stderr)
        return
    try:
        verify_folder(ckpt)
    except CheckpointDamaged as e:
        raise InferenceFolderError(str(e)) from None


def read_train_configs(ckpt: Path) -> tuple[ModelConfig, DiffusionConfig, dict[str, Any]]:
    """Model/diffusion configs and provenance from train_state.pt (only those sections are read)."""
    path = ckpt / "train_state.pt"
    if not path.is_file():
        raise InferenceFolderError(f"checkpoint '{ckpt}' has no train_state.pt, so its model config is unknown")
    try:
        state = load_plain(path)
    except (PickledCheckpointFile, CheckpointDamaged) as e:
        raise InferenceFolderError(str(e)) from None
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or "model" not in config:
        raise InferenceFolderError(f"{path} holds no config with a 'model' section")
    try:
        model = from_dict(ModelConfig, config["model"], prefix="model")
        model.validate()
        diffusion = from_dict(DiffusionConfig, config.get("diffusion", {}), prefix="diffusion")
        diffusion.validate()
    except ConfigError as e:
        raise InferenceFolderError(f"{path}: {e}") from None
    return model, diffusion, {"checkpoint": str(ckpt.resolve()), "step": state.get("step")}


def load_model_state(ckpt: Path, cfg: ModelConfig, ema: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's full model tensors (`ema`: its EMA weights) with plain-model names, read
    offline (either engine's format); names and shapes are checked before any tensor is read."""

    def check(shapes: dict[str, tuple[int, ...]]) -> None:
        check_tensors(expected_shapes(cfg), shapes, f"checkpoint '{ckpt}'", cfg)

    try:
        return read_full_weights(ckpt, check, ema)
    except ConfigError as e:
        raise InferenceFolderError(str(e)) from None


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse to overwrite an earlier conversion unless asked, then remove only its files."""
    ours = [p for p in out.glob("*") if p.name in ("config.json", TOKENIZER_NAME, VAE_DIR, VQ_DIR, "generation_config.json")
            or (p.name.startswith("model") and ".safetensors" in p.name)] if out.is_dir() else []
    if ours and not overwrite:
        raise InferenceFolderError(f"'{out}' already holds a converted model ({ours[0].name}); pass --overwrite or pick another folder")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_size: int | str = "2GB",
    tokenizer: str | Path | None = None, vae: str | Path | None = None, vae_mode: str = "copy",
    hf_llama: str | Path | None = None, overwrite: bool = False, vq: str | Path | None = None, ema: bool = False,
) -> InferenceConfig:
    """Write the inference folder (and optionally the HF Llama export); returns its config.

    `vq` (a VQModel folder) is the image codec of a `model.image_representation: tokens` checkpoint,
    copied or referenced like the VAE (`vae_mode`); `ema` exports the EMA weights (train.ema_decay)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = resolve_checkpoint(ckpt_dir)
    verify_checkpoint(ckpt)
    model_cfg, diffusion_cfg, source = read_train_configs(ckpt)
    if tokenizer is not None:
        TextTokenizer(tokenizer, model_cfg)  # fail before writing anything
    tokens = model_cfg.image_representation == "tokens"
    if vae is not None and tokens:
        raise ValueError(f"checkpoint '{ckpt}' models images as VQ tokens: pass its VQ model (--vq), not a VAE")
    if vq is not None and not tokens:
        raise ValueError(f"checkpoint '{ckpt}' models images as VAE latents: pass --vae, not --vq")
    if vae is not None:
        load_vae(vae, model_cfg)
    if vq is not None:
        try:
            check_vq(load_vq(vq), model_cfg.latent_size, model_cfg.image_codebook_size, str(vq))
        except VQError as e:
            raise InferenceFolderError(str(e)) from None
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    if hf_llama is not None:
        _prepare_output(Path(hf_llama), overwrite)

    state = load_model_state(ckpt, model_cfg, ema)
    source["weights"] = "ema" if ema else "raw"
    state = {n: t.to(DTYPES[dtype]) if t.is_floating_point() else t for n, t in state.items()}
    save_weights(state, out, max_shard_size)
    cfg = InferenceConfig(model_cfg, diffusion_cfg, dtype, source=source)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_NAME)
        cfg.tokenizer = TOKENIZER_NAME
    if vae is not None:
        cfg.vae = _attach_folder(vae, out, VAE_DIR, vae_mode)
    if vq is not None:
        cfg.vq = _attach_folder(vq, out, VQ_DIR, vae_mode)
    write_config(out, cfg)  # last: a folder without config.json is an unfinished conversion
    if hf_llama is not None:
        export_hf_llama(state, model_cfg, hf_llama, max_shard_size, tokenizer)
    cfg.folder = out.resolve()
    return cfg


def _attach_folder(src: str | Path, out: Path, name: str, mode: str) -> str:
    """Copy the model folder `src` into out/name ("copy"), or reference it; the path config.json stores."""
    if mode == "copy":
        shutil.copytree(src, out / name)
        return name
    return os.path.relpath(Path(src).resolve(), out.resolve())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m inference.convert", description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir", help="a step_N checkpoint folder (or a run's checkpoints/ folder: latest step)")
    ap.add_argument("out_dir", help="inference folder to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the stored weights")
    ap.add_argument("--max-shard-size", default="2GB", help="shard the safetensors above this size (e.g. 2GB, 500MB)")
    ap.add_argument("--tokenizer", default=None, help="sentencepiece .model file to copy into the folder")
    ap.add_argument("--vae", default=None, help="AutoencoderKL save_pretrained folder")
    ap.add_argument("--vq", default=None, help="VQModel save_pretrained folder (model.image_representation=tokens)")
    ap.add_argument("--vae-mode", choices=["copy", "reference"], default="copy",
                    help="copy the VAE (or VQ model) into OUT_DIR, or store a relative path to it in config.json")
    ap.add_argument("--hf-llama", default=None, metavar="HF_OUT",
                    help="also export the text backbone as a Hugging Face LlamaForCausalLM folder")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR / HF_OUT")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (a run with train.ema_decay > 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_shard: int | str = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    print(f"warning: {TRUST_WARNING}", file=sys.stderr)
    try:
        cfg = convert_checkpoint(
            args.ckpt_dir, args.out_dir, args.dtype, max_shard, args.tokenizer, args.vae, args.vae_mode,
            args.hf_llama, args.overwrite, args.vq, args.ema,
        )
    except (InferenceFolderError, TokenizerError, VAEError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in cfg.folder.iterdir()) if cfg.folder else []
    print(f"converted {cfg.source['checkpoint']} (step {cfg.source['step']}) -> {cfg.folder}: {', '.join(files)}")
    if args.hf_llama:
        print(f"hf llama: {args.hf_llama}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
