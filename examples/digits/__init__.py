"""The embedded digits demo (`make demo`, README "Quick start"), run as modules:

    python -m examples.digits.prepare --out outputs/embedded_default      # data, tokenizer, VAE, shards
    python -m trainer.train --config configs/tiny.yaml                    # the library's trainer
    python -m examples.digits.evaluate --run outputs/tiny --data outputs/embedded_default

`prepare` runs the data_prep tools on data shipped inside PyPI packages (no network); `evaluate`
converts the run's checkpoint and scores caption -> digit and digit -> caption with the digit
classifier of `classifier`.
"""
