"""Inference folders: DCP checkpoint -> safetensors round trip, sharding, HF Llama export, errors.

The fixtures (a 2-step tiny run, its checkpoint, a sentencepiece model, a tiny VAE and the converted
folder) live in tests/conftest.py, shared with tests/test_inference_generate.py and test_image_attention.py.
"""

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from inference.convert import convert_checkpoint, main as convert_main
from inference.loading import InferenceFolderError, load_inference_model
from model.diffusion import NoiseSchedule
from tests.helpers import inference_run_config, one_thread  # noqa: F401 (one_thread: autouse fixture)
from config import load_config


def _outputs(model, batch):
    """Logits and noise predictions on a packed batch at fixed noise."""
    gen = torch.Generator().manual_seed(0)
    noisy, t, _ = NoiseSchedule(load_config(None).diffusion).sample_training_inputs(batch.latents, batch.image_max_t, gen)
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
    return out.logits, out.noise_pred


def test_round_trip_same_tensors_and_outputs(run, folder):
    model, cfg, tokenizer, vae = load_inference_model(folder)
    want = run["model"].state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert cfg.model == run["cfg"].model and cfg.diffusion == run["cfg"].diffusion
    assert cfg.source["step"] == 2 and tokenizer is not None and vae is not None
    batch = run["batch"]
    assert batch.num_images > 0
    for a, b in zip(_outputs(model, batch), _outputs(run["model"], batch)):
        assert torch.equal(a, b)


def test_converts_a_checkpoint_written_by_the_trainer(tmp_path):
    from trainer.train import train

    cfg = inference_run_config(tmp_path / "run")
    cfg.checkpoint.enabled = True
    train(cfg)
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    out = convert_checkpoint(tmp_path / "run", tmp_path / "inf")  # the run folder resolves to its latest step
    assert out.source["checkpoint"] == str(ckpt.resolve()) and out.model == cfg.model
    model, *_ = load_inference_model(tmp_path / "inf")
    ref = {n: torch.empty_like(t) for n, t in model.state_dict().items()}
    dcp.load({"model": ref}, checkpoint_id=str(ckpt))
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())


def test_folder_layout_and_config(folder, spm_model, vae_dir):
    data = json.loads((folder / "config.json").read_text())
    assert data["format"] == "transfusion" and data["dtype"] == "fp32"
    assert data["model"]["n_kv_heads"] == 2 and data["diffusion"]["schedule"] == "cosine"
    assert data["tokenizer"] == "tokenizer.model" and data["vae"] == "vae"
    assert (folder / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    assert (folder / "vae" / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not (folder / "model.safetensors.index.json").exists()


def test_sharded_and_bf16_outputs_load_back(run, folder, vae_dir, tmp_path):
    ref = load_file(folder / "model.safetensors")
    convert_checkpoint(run["ckpt"], tmp_path / "sharded", max_shard_size="300KB", vae=vae_dir, vae_mode="reference")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    model, cfg, _, vae = load_inference_model(tmp_path / "sharded")
    assert cfg.vae == os.path.relpath(vae_dir.resolve(), (tmp_path / "sharded").resolve())
    assert vae is not None  # the referenced VAE resolves relative to the folder
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())

    convert_checkpoint(run["ckpt"], tmp_path / "bf16", dtype="bf16")
    model16, cfg16, _, _ = load_inference_model(tmp_path / "bf16")
    assert cfg16.dtype == "bf16" and all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert all(torch.equal(t, ref[n].to(torch.bfloat16)) for n, t in model16.state_dict().items())
    model32, *_ = load_inference_model(tmp_path / "bf16", dtype="fp32")
    assert next(model32.parameters()).dtype == torch.float32


def test_hf_llama_export_matches_text_logits(run, folder, spm_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from inference.tokenizer import TextTokenizer

    hf = LlamaForCausalLM.from_pretrained(folder.parent / "hf", dtype=torch.float32).eval()
    model = run["model"]
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4  # GQA
    ids = torch.randint(5, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    B, S = ids.shape
    pos = torch.arange(S).expand(B, S)
    lo = torch.zeros(B, S, dtype=torch.int32)
    hi = (pos + 1).to(torch.int32)
    no_img = torch.zeros(B, S, dtype=torch.bool)
    C, s = model.cfg.latent_channels, model.cfg.latent_size
    with torch.no_grad():
        ours = model(ids, pos, lo, hi, no_img, torch.zeros(0, C, s, s), torch.zeros(0, dtype=torch.long)).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(folder.parent / "hf")  # the copied sentencepiece model
    assert tok("red green blue").input_ids == [1] + TextTokenizer(spm_model, model.cfg).encode("red green blue")


def test_convert_cli_and_checkpoint_errors(run, tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert_main([str(tmp_path), str(tmp_path / "out")]) == 2  # a folder without checkpoints
    assert "is not a checkpoint (no DCP .metadata or deepspeed/ folder)" in capsys.readouterr().err
    # The run's output dir resolves to its latest step.
    assert convert_main([str(run["ckpt"].parent.parent), str(tmp_path / "ok")]) == 0
    assert "step 2" in capsys.readouterr().out
    assert convert_main([str(run["ckpt"]), str(tmp_path / "ok")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "ok" / "notes.txt").write_text("mine")
    assert convert_main([str(run["ckpt"]), str(tmp_path / "ok"), "--overwrite", "--max-shard-size", "300KB"]) == 0
    assert (tmp_path / "ok" / "notes.txt").is_file() and not (tmp_path / "ok" / "model.safetensors").exists()
    assert load_inference_model(tmp_path / "ok")[1].source["step"] == 2

    # A checkpoint whose stored config does not describe its weights.
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(run["ckpt"], bad)
    state = torch.load(bad / "train_state.pt", weights_only=True)
    state["config"]["model"]["n_layers"] = 5
    torch.save(state, bad / "train_state.pt")
    with pytest.raises(InferenceFolderError, match=r"missing \d+ tensors: layers\.4\.") as e:
        convert_checkpoint(bad, tmp_path / "bad_out")
    assert "the weights have 4 layers but the config says model.n_layers=5" in str(e.value)


def test_folder_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(InferenceFolderError, match="does not exist"):
        load_inference_model(tmp_path / "missing")
    with pytest.raises(InferenceFolderError, match="no config.json"):
        load_inference_model(tmp_path)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    sd = load_file(broken / "model.safetensors")
    sd.pop("layers.1.attention.wk.weight")
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:64]
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(InferenceFolderError) as e:
        load_inference_model(broken)
    msg = str(e.value)
    assert "missing 1 tensors: layers.1.attention.wk.weight" in msg
    assert "layers.0.attention.wq.weight [64, 128] (config implies [128, 128])" in msg

    mismatched = tmp_path / "mismatched"
    shutil.copytree(folder, mismatched)
    data = json.loads((mismatched / "config.json").read_text())
    data["model"]["d_model"] = 256
    (mismatched / "config.json").write_text(json.dumps(data))
    with pytest.raises(InferenceFolderError, match="d_model=256"):
        load_inference_model(mismatched)

    (mismatched / "vae").rename(mismatched / "vae_moved")
    data["model"]["d_model"] = 128
    (mismatched / "config.json").write_text(json.dumps(data))
    with pytest.raises(InferenceFolderError, match="VAE at 'vae'"):
        load_inference_model(mismatched)
