"""Our text backbone's tensor names and layout <-> Hugging Face Llama's, in both directions.

Our `apply_rope` rotates interleaved pairs (2i, 2i+1) of each head; HF Llama rotates halves
(`rotate_half`: pair (i, i + D/2)). Permuting the rows of wq/wk within each head, evens first then
odds, maps one convention onto the other (the inverse of what Meta->HF conversion undoes); q.k
products are unchanged because q and k get the same permutation. wv/wo are untouched. The patch
codecs and the timestep embedding have no Llama counterpart.
"""

from __future__ import annotations

import torch

from config import ModelConfig

_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
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


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_halves`."""
    out_dim, d_in = w.shape
    D = out_dim // n_heads
    return w.view(n_heads, 2, D // 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


def llama_names(cfg: ModelConfig) -> dict[str, str]:
    """Our backbone tensor name -> the HF LlamaForCausalLM name."""
    names = dict(_TOP_NAMES)
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _BLOCK_NAMES.items()})
    return names


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows are permuted between the conventions (wq: n_heads, wk: kv_heads), else None."""
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.kv_heads
    return None


def llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF LlamaForCausalLM names (patch codecs dropped, q/k rows permuted)."""
    out = {}
    for ours, theirs in llama_names(cfg).items():
        w, heads = state[ours], _rope_heads(ours, cfg)
        out[theirs] = (interleaved_to_halves(w, heads) if heads else w).contiguous()
    return out


def from_llama_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our names (the backbone only; names HF has and we do not are left out)."""
    out = {}
    for ours, theirs in llama_names(cfg).items():
        if theirs in hf:
            w, heads = hf[theirs], _rope_heads(ours, cfg)
            out[ours] = (halves_to_interleaved(w, heads) if heads else w).contiguous()
    return out
