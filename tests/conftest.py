"""Shared fixtures. Triton kernels run on CPU through the interpreter, which must be enabled before
triton is first imported.

TRANSFUSION_TEST_DEVICE=cuda (set by benchmarks/gpu_check.py) runs the kernel tests
(tests/test_kernels_*.py) on the GPU instead: their tensors go to TEST_DEVICE and the Triton kernels
are compiled, so the interpreter is switched off ("0": the files' setdefault then leaves it off).
Unset, nothing changes: CPU tensors, interpreted kernels."""

import os

TEST_DEVICE = os.environ.get("TRANSFUSION_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny config with wandb off and outputs in a temp folder."""
    from config import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        ["logging.wandb=disabled", f"train.output_dir={tmp_path / 'run'}", "checkpoint.enabled=false",
         "data.source=synthetic", "eval.every=0"],
    )


# The inference tests' model, tokenizer, VAE and converted folder: used by tests/test_inference.py,
# tests/test_inference_generate.py and tests/test_image_attention.py. Session-scoped, so they are built
# once per run however many of those modules it collects. (tests.helpers imports this module, so it
# is imported inside the fixtures.)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A tiny model trained 2 steps, checkpointed in the trainer's layout: DCP {"model", "optim"}
    from get_state_dict, plus train_state.pt with the config."""
    from tests.helpers import inference_run_config, train_and_checkpoint

    out = tmp_path_factory.mktemp("run")
    cfg = inference_run_config(out)
    engine, loader, ckpt = train_and_checkpoint(cfg, out, 2)
    # One process, no pipeline: the engine's only part is the plain model.
    return {"cfg": cfg, "model": engine.parts[0].eval(), "ckpt": ckpt, "batch": next(loader)}


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A small sentencepiece BPE with the data_prep special ids: pad 0, bos 1, eos 2, <boi> 3, <eoi> 4."""
    import numpy as np
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "digit", "one", "two", "three", "a", "photo", "of", "the", "cat", "dog"]
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=80, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=5, control_symbols=["<boi>", "<eoi>"], minloglevel=2,
        hard_vocab_limit=False,
    )
    return d / "tok.model"


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A random tiny AutoencoderKL (2x downsampling: 8x8x4 latents <-> 16x16 RGB)."""
    from examples.tiny_assets import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="session")
def folder(run, spm_model, vae_dir, tmp_path_factory):
    """The converted inference folder (fp32, tokenizer and VAE copied) and its HF Llama export."""
    from inference.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    convert_checkpoint(run["ckpt"], root / "inf", tokenizer=spm_model, vae=vae_dir, hf_llama=root / "hf")
    return root / "inf"
