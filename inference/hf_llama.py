"""Export the text backbone (embeddings, blocks, final norm, LM head) as a Hugging Face Llama folder
(the name and RoPE-layout mapping: model/llama_names.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import LlamaConfig

from config import ModelConfig
from model.llama_names import llama_state_dict


def llama_config(cfg: ModelConfig, dtype: torch.dtype) -> LlamaConfig:
    """The LlamaConfig of our backbone (untied head, no biases, SiLU SwiGLU, GQA via n_kv_heads)."""
    t = cfg.tokens
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=t.bos, eos_token_id=t.eos, pad_token_id=t.pad,
        dtype=dtype,
    )


def export_hf_llama(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, max_shard_size: int | str = "5GB",
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a folder that `LlamaForCausalLM.from_pretrained(out_dir)` loads (text-only logits equal ours).

    The tokenizer, if given, is copied as tokenizer.model (the sentencepiece file HF's LlamaTokenizer reads).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = llama_state_dict(state, cfg)
    dtype = next(iter(hf.values())).dtype
    llama_config(cfg, dtype).save_pretrained(out)
    save_torch_state_dict(hf, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out
