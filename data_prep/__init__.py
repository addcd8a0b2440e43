"""Offline data preparation: tokenizer, VAE, latent and text shards (docs/architecture.md §1).

Tools (each runs as `python -m data_prep.<name>`, `python data_prep/<name>.py` or the console script
`transfusion-<name>` with dashes; errors a user must fix print as one line):
  train_tokenizer  sentencepiece BPE with pad/bos/eos/<boi>/<eoi> at fixed ids
  train_vae        a small diffusers AutoencoderKL, saved with save_pretrained
  encode_latents   images + captions -> MDS shards of VAE latent distributions + caption ids
  tokenize_text    text corpora -> MDS shards of token ids
  merge_index      one streaming index (and report) over all workers' parts
The whole pipeline on data shipped inside PyPI packages (no network) is the embedded demo,
`python -m examples.digits.prepare`, outside this package.

The shard columns are defined once, in `data_prep.schema`, which also refuses (`check_index`) any
shard set holding other columns or encodings before a sample is read. Input readers
(`data_prep.readers`, `data_prep.text_readers`) never stop a job on one bad record: they count it
with a reason and a 1-based location, name damaged containers, and rename repeated keys `key#n`.
"""
