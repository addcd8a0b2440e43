"""Export the text backbone (embeddings, blocks, final norm, LM head) as a Hugging Face Llama.

Our `apply_rope` rotates interleaved pairs (2i, 2i+1) of each head; HF Llama rotates halves
(`rotate_half`: pair (i, i + D/2)). Permuting the rows of wq/wk within each head, evens first then
odds, maps one convention onto the other (the inverse of what Meta->HF conversion undoes); q.k
products are unchanged because q and k get the same permutation. wv/wo are untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import LlamaConfig

from config import ModelConfig

_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection [n_heads * D, d_model]: per head (x0, x1, x2, ...) -> (x0, x2, ..., x1, x3, ...)."""
    out_dim, d_in = w.shape
    D = out_dim // n_heads
    return w.view(n_heads, D // 2, 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


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


def llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF LlamaForCausalLM names (patch codecs dropped, q/k rows permuted)."""
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            w = state[f"layers.{i}.{ours}"]
            if ours == "attention.wq.weight":
                w = interleaved_to_halves(w, cfg.n_heads)
            elif ours == "attention.wk.weight":
                w = interleaved_to_halves(w, cfg.kv_heads)
            out[f"model.layers.{i}.{theirs}"] = w.contiguous()
    return out


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
