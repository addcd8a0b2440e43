"""Offline data preparation: tokenizer, VAE, latent and text shards (DESIGN.md §1).

Tools (each is `python -m data_prep.<name> --help`):
  train_tokenizer  sentencepiece BPE with pad/bos/eos/<boi>/<eoi> at fixed ids
  train_vae        a small diffusers AutoencoderKL, saved with save_pretrained
  encode_latents   images + captions -> MDS shards of VAE latent distributions + caption ids
  tokenize_text    text corpora -> MDS shards of token ids
  merge_index      one streaming index (and report) over all workers' parts
  embedded_default the whole pipeline on data shipped inside PyPI packages (no network)

The shard columns are defined once, in `data_prep.schema`.
"""
