"""The discrete-image baseline (model.image_representation: tokens): VQ tokenizer, token shards,
LM-only packed batches, and generation with CFG on logits decoded by the VQ model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from streaming import LocalDataset

from data_prep import encode_vq_tokens, train_vq
from data_prep.images import load_image
from data_prep.schema import SchemaError, check_index
from examples import tiny_assets
from model.batch import IGNORE_INDEX
from config import ConfigError
from model.vq import decode_codes, encode_codes, load_vq
from tests.conftest import REPO
from tests.helpers import one_thread, tiny_run_config, train_and_checkpoint  # noqa: F401 (one_thread: autouse fixture)

RES, GRID, CODES = 16, 8, 16  # 16 px images -> 8x8 codes of a 16-entry codebook
SEQ = 128  # 32 caption tokens + 64 codes + 4 specials fit


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tokenizer, 12 captioned PNGs, a VQ model trained a few steps, and the token shards."""
    root = tmp_path_factory.mktemp("tokens")
    tok = tiny_assets.make_tiny_tokenizer(root / "tok" / "tiny")
    (root / "img").mkdir()
    with open(root / "manifest.jsonl", "w") as f:
        for i in range(12):
            (root / "img" / f"{i}.png").write_bytes(tiny_assets.image_bytes(i, (20, 20)))
            f.write(json.dumps({"key": f"k{i}", "path": f"img/{i}.png", "caption": tiny_assets.caption(i)}) + "\n")
    report = train_vq.main(["--input", str(root / "manifest.jsonl"), "--out", str(root / "vq"), "--resolution",
                            str(RES), "--block-out-channels", "8,16", "--codebook-size", str(CODES), "--steps", "3",
                            "--batch-size", "4", "--restart-every", "2"])
    assert report["code_grid"] == [GRID, GRID] and (root / "vq" / "config.json").is_file()
    encode_vq_tokens.main(["--input", str(root / "manifest.jsonl"), "--out", str(root / "shards"), "--vq",
                           str(root / "vq"), "--tokenizer", str(tok), "--resolution", str(RES), "--min-size", "8",
                           "--batch-size", "4", "--chunk-size", "5"])
    vocab = json.loads((root / "shards" / "dataset_info.json").read_text())["vocab_size"]
    return {"root": root, "tok": tok, "vq": root / "vq", "shards": root / "shards", "text_vocab": vocab}


def token_config(data, out, *extra: str):
    v = data["text_vocab"]
    return tiny_run_config(
        out, SEQ, "train.batch_size=2", "train.device=cpu", "checkpoint.enabled=false",
        "model.image_representation=tokens", f"model.vocab_size={v + CODES}", f"model.image_token_offset={v}",
        f"model.image_codebook_size={CODES}", f"model.latent_size={GRID}",
        f"data.streams=[{{path: {data['shards']}, kind: image_tokens}}]", *extra)


def test_token_shards_pass_the_schema_and_round_trip(data):
    assert check_index(data["shards"], "image_tokens") == "image_tokens"
    with pytest.raises(SchemaError, match="configured as a stream of kind 'image'"):
        check_index(data["shards"], "image")
    ds = LocalDataset(str(data["shards"]))
    assert len(ds) == 12
    vq = load_vq(data["vq"])
    for i in (0, 7):
        s = ds[i]
        codes = np.array(s["image_tokens"])
        assert codes.dtype == np.int32 and codes.shape == (GRID * GRID,)
        assert 0 <= codes.min() and codes.max() < CODES
        pixels = load_image((data["root"] / "img" / f"{i}.png").read_bytes(), RES)[0]
        with torch.no_grad():  # the stored codes are the VQ model's codes of the preprocessed image
            assert torch.equal(encode_codes(vq, pixels[None])[0].flatten(), torch.from_numpy(codes).long())
            image = decode_codes(vq, torch.from_numpy(codes).long().reshape(1, GRID, GRID))
        assert image.shape == (1, 3, RES, RES) and image.isfinite().all()


def test_packed_batches_carry_no_latents_and_targets_cover_image_tokens(data, tmp_path):
    from trainer.data import build_loader

    cfg = token_config(data, tmp_path / "run", "data.caption_dropout=0.3", "data.image_first_prob=0.3")
    lo, hi = cfg.model.image_token_range
    t = cfg.model.tokens
    loader = build_loader(cfg)
    stored = {tuple(np.asarray(s["image_tokens"]).tolist()) for s in LocalDataset(str(data["shards"]))}
    images = 0
    for _ in range(4):
        b = next(loader)
        b.check()
        assert b.latents.shape[0] == 0 and b.image_slots.shape[0] == 0 and not b.is_image.any()
        for r in range(b.tokens.shape[0]):
            tok, tgt = b.tokens[r].tolist(), b.text_targets[r].tolist()
            for i, x in enumerate(tok):
                if lo <= x < hi:  # every code is a target of the position before it
                    assert tgt[i - 1] == x
            for i in [i for i, x in enumerate(tok) if x == t.boi]:  # whole images, never split across rows
                codes = tok[i + 1:i + 1 + GRID * GRID]
                assert tok[i + 1 + GRID * GRID] == t.eoi and tgt[i + GRID * GRID] == t.eoi
                assert tuple(c - lo for c in codes) in stored
                images += 1
        code_positions = ((b.tokens >= lo) & (b.tokens < hi)).sum().item()
        assert code_positions == GRID * GRID * (b.tokens == t.boi).sum().item()
        assert (b.text_targets != IGNORE_INDEX).sum() >= code_positions
    assert images >= 4


def test_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match=r"image_token_offset=\d+ \+ model.image_codebook_size=16 = \d+ exceeds "
                                          r"model.vocab_size"):
        token_config(data, tmp_path, f"model.vocab_size={data['text_vocab'] + CODES - 1}")
    with pytest.raises(ConfigError, match="needs model.image_representation=latent"):
        token_config(data, tmp_path, f"data.streams=[{{path: {data['shards']}, kind: image}}]")
    from trainer.data import build_loader

    with pytest.raises(ConfigError, match="image_token_offset >= "):  # codes would overlap the text ids
        build_loader(token_config(data, tmp_path, "model.image_token_offset=10"))
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
                        "--check", "model.image_representation=tokens", "model.image_codebook_size=4096",
                        "model.image_token_offset=2000"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "exceeds model.vocab_size=2000" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory):
    """A tokens-representation model trained 3 steps on the token shards, converted with its VQ model."""
    from inference.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("tokens_run")
    _, _, ckpt = train_and_checkpoint(token_config(data, out), out, 3)
    with pytest.raises(ValueError, match="pass its VQ model"):
        convert_checkpoint(ckpt, out / "bad", vae=data["vq"])
    convert_checkpoint(ckpt, out / "inf", tokenizer=data["tok"], vq=data["vq"])
    return out / "inf"


def manual_codes(gen, prompt_ids: list[int], scale: float) -> list[int]:
    """Greedy codes recomputed from scratch at every position, with CFG on the logits (no cache, no engine)."""
    m, t = gen.model, gen.cfg.tokens
    lo, hi = gen.cfg.image_token_range

    def last_logits(ids: list[int]) -> torch.Tensor:
        n = len(ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            out = m(x, torch.arange(n)[None], torch.zeros(1, n, dtype=torch.int32),
                    torch.arange(1, n + 1, dtype=torch.int32)[None], torch.zeros(1, n, dtype=torch.bool),
                    torch.zeros(0, gen.cfg.latent_channels, GRID, GRID), torch.zeros(0, dtype=torch.int64))
        return out.logits[0, -1].float()

    cond, uncond, codes = prompt_ids + [t.boi], [t.bos, t.boi], []
    for _ in range(GRID * GRID):
        lc = last_logits(cond)
        logits = lc if scale == 1 else last_logits(uncond) + scale * (lc - last_logits(uncond))
        tok = lo + int(logits[lo:hi].argmax())
        cond.append(tok)
        uncond.append(tok)
        codes.append(tok - lo)
    return codes


def test_generation_decodes_and_cfg_scale_one_is_the_conditional_path(folder, data):
    from inference.generate import TransfusionGenerator

    gen = TransfusionGenerator.from_folder(folder)
    assert gen.tokens_mode and gen.image_resolution() == RES
    prompt = "a red cat"
    ids = [gen.cfg.tokens.bos] + gen.tokenizer.encode(prompt)
    for scale in (1.0, 3.0):
        res = gen.generate([prompt], mode="image", cfg_scale=scale, temperature=0.0)[0]
        assert res.finish_reason == "image" and res.tokens == [gen.cfg.tokens.boi, gen.cfg.tokens.eoi]
        codes = res.images[0]
        assert codes.shape == (GRID, GRID) and codes.dtype == torch.int64
        assert codes.flatten().tolist() == manual_codes(gen, ids, scale)
    sampled = gen.generate([prompt, "the dog"], mode="image", cfg_scale=2.0, seed=1)
    pixels = gen.decode_images(torch.stack([r.images[0] for r in sampled]))
    assert pixels.shape == (2, 3, RES, RES) and pixels.isfinite().all() and 0 <= pixels.min() and pixels.max() <= 1


def test_caption_mode_encodes_the_image_with_the_vq_model(folder, data):
    from inference.generate import TransfusionGenerator
    from inference.prompts import ImagePart, PromptError

    gen = TransfusionGenerator.from_folder(folder)
    png = data["root"] / "img" / "3.png"
    codes = gen.encode_image(str(png))
    stored = np.asarray(LocalDataset(str(data["shards"]))[3]["image_tokens"])
    assert codes.flatten().tolist() == stored.tolist()
    a = gen.generate([[ImagePart(path=str(png))]], mode="caption", temperature=0.0, max_new_tokens=5)[0]
    b = gen.generate([[ImagePart(latent=codes)]], mode="caption", temperature=0.0, max_new_tokens=5)[0]
    assert a.tokens == b.tokens and len(a.tokens) >= 1
    lo, hi = gen.cfg.image_token_range
    assert not any(lo <= x < hi for x in a.tokens)  # codes never appear in text
    with pytest.raises(PromptError, match="grid of integer VQ codes"):
        gen.generate([[ImagePart(latent=torch.zeros(4, GRID, GRID))]], mode="caption")


def test_generate_cli_image_mode_on_a_tokens_folder(folder, tmp_path):
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "inference.generate", str(folder), "--mode", "image", "--prompt",
                        "a blue dog", "--cfg-scale", "2", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "results.json").read_text())
    assert summary["rows"][0]["images"][0].endswith(".png") and (out / "grid.png").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["image_representation"] == "tokens" and config["vq"] == "vq" and config["vae"] is None
