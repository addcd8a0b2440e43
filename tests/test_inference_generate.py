"""Generation: KV cache == full recompute, CFG, seeds, batching, samplers, modes, CLI and prompt errors.

Uses the tiny random model converted by tests/conftest.py's `folder` (max_seq_len 64, 16 patches per
image). Cached and uncached runs use different attention shapes, so latents are compared to 1e-4
(eps agree to ~1e-6; the DDPM update amplifies that by at most ~1/sqrt(abar_t)); tokens exactly.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import inference.generate as generate_mod
from inference import GenerationConfig, ImagePart, InferenceFolderError, PromptError, TransfusionGenerator
from inference.engine import Group, RowState
from inference.generate import main as generate_main
from inference.sampling import make_sampler
from model.diffusion import make_scheduler
from model.layers import KVCache
from tests.helpers import INFERENCE_SEQ as SEQ, one_thread  # noqa: F401 (one_thread: autouse fixture)

STEPS = 6


@pytest.fixture(scope="module")
def gen(folder):
    return TransfusionGenerator.from_folder(folder)


def latent(seed, cfg):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)


def both(gen, prompts, **kw):
    """The same request with and without the KV cache."""
    return gen.generate(prompts, use_cache=True, **kw), gen.generate(prompts, use_cache=False, **kw)


def assert_same(a, b, atol=1e-4):
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        assert len(x.images) == len(y.images)
        for i, j in zip(x.images, y.images):
            torch.testing.assert_close(i, j, rtol=atol, atol=atol)


def test_cached_forward_equals_full_forward(gen):
    """Model level: a prefix through the cache, then [BOI + image + EOI + text] against it."""
    model, cfg = gen.model, gen.cfg
    row = RowState.from_segments([[1, 7, 8, 9], latent(0, cfg), [10, 11]], cfg)
    row.images[0].t = 500
    full = Group(model, [row], use_cache=False)
    logits_full, eps_full = full.forward(append=False)
    cached_row = RowState.from_segments([[1, 7, 8, 9]], cfg)
    g = Group(model, [cached_row], use_cache=True)
    g.forward(append=True)
    assert g.cache.length == 4
    t = cfg.tokens
    cached_row.add_tokens([t.boi])
    cached_row.add_image(latent(0, cfg), cfg.patches_per_image, t.pad, t=500)
    cached_row.add_tokens([t.eoi, 10, 11])
    logits, eps = g.forward(append=True)
    torch.testing.assert_close(logits, logits_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps, eps_full, rtol=0, atol=1e-5)
    assert isinstance(g.cache, KVCache) and g.cache.length == len(cached_row)


def test_text_generation_cache_equals_recompute_and_rows_are_independent(gen):
    prompts = [[5, 6, 7, 8, 9, 10], [11], "red green blue"]
    for temperature, top_k, top_p in ((0.0, None, None), (1.0, 20, 0.9)):
        cached, full = both(gen, prompts, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
        assert_same(cached, full)
        assert all(len(r.tokens) == 10 or r.finish_reason == "eos" for r in cached)
        alone = gen.generate([prompts[1]], max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=4)
        assert alone[0].tokens == cached[1].tokens  # row 1 draws from seed + 1 whatever the batch
    assert isinstance(cached[2].text, str)


def test_image_generation_cache_equals_recompute(gen):
    cached, full = both(gen, [[5, 6, 7], [8, 9, 10, 11, 12]], mode="image", steps=STEPS, cfg_scale=3.0, seed=1)
    assert_same(cached, full)
    assert all(r.finish_reason == "image" and r.tokens == [gen.cfg.tokens.boi, gen.cfg.tokens.eoi] for r in cached)
    assert cached[0].images[0].shape == (4, 8, 8) and torch.isfinite(cached[0].images[0]).all()


def test_cfg_scale_one_equals_the_conditional_prediction(gen, monkeypatch):
    cond_only = gen.generate([[5, 6, 7]], mode="image", steps=STEPS, cfg_scale=1.0, sampler="ddim")
    seen = []
    real = generate_mod.guided_noise

    def spy(eps_c, eps_u, scale, *image):
        seen.append(eps_u is not None)
        return real(eps_c, eps_u, scale, *image)

    monkeypatch.setattr(TransfusionGenerator, "_needs_uncond", lambda self, cfg: True)
    monkeypatch.setattr(generate_mod, "guided_noise", spy)
    with_uncond = gen.generate([[5, 6, 7]], mode="image", steps=STEPS, cfg_scale=1.0, sampler="ddim")
    assert seen and all(seen)  # the uncond rows really were in the batch
    torch.testing.assert_close(with_uncond[0].images[0], cond_only[0].images[0], rtol=0, atol=1e-5)
    guided = gen.generate([[5, 6, 7]], mode="image", steps=STEPS, cfg_scale=4.0, sampler="ddim")
    assert not torch.allclose(guided[0].images[0], cond_only[0].images[0], atol=1e-3)


def test_edit_guidance_has_a_scale_for_the_text_and_one_for_the_prompt_images(gen, monkeypatch):
    """Two scales (InstructPix2Pix): equal scales give one-scale guidance over the whole prompt; the
    third row is the prompt's images without its text (guided by it alone, the result equals the
    image-only prompt's conditional sample); other scales change the result."""
    edit = [ImagePart(latent=latent(2, gen.cfg)), [5, 6, 7]]
    kw = dict(mode="image", steps=STEPS, sampler="ddim", seed=5)
    one = gen.generate([edit], cfg_scale=3.0, **kw)[0].images[0]
    two = gen.generate([edit], cfg_scale=3.0, image_cfg_scale=3.0, **kw)[0].images[0]
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4)
    other = gen.generate([edit], cfg_scale=3.0, image_cfg_scale=1.5, **kw)[0].images[0]
    assert not torch.allclose(other, one, atol=1e-3)
    image_only = gen.generate([[ImagePart(latent=latent(2, gen.cfg))]], cfg_scale=1.0, **kw)[0].images[0]
    monkeypatch.setattr(generate_mod, "guided_noise", lambda eps_c, eps_u, scale, eps_i, s_i: eps_i)
    from_third_row = gen.generate([edit], cfg_scale=3.0, image_cfg_scale=1.5, **kw)[0].images[0]
    torch.testing.assert_close(from_third_row, image_only, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="image_cfg_scale guides generated images; mode 'text'"):
        gen.generate([edit], mode="text", image_cfg_scale=1.5)


def test_seeds_batches_and_samplers(gen):
    kw = dict(mode="image", steps=STEPS, cfg_scale=2.0)
    a = gen.generate([[5, 6, 7]], seed=7, **kw)[0].images[0]
    b = gen.generate([[5, 6, 7]], seed=7, **kw)[0].images[0]
    c = gen.generate([[5, 6, 7]], seed=8, **kw)[0].images[0]
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-2)
    batch = gen.generate([[9, 9], [5, 6, 7]], seed=6, **kw)  # row 1 uses seed 6 + 1 = 7
    torch.testing.assert_close(batch[1].images[0], a, rtol=0, atol=1e-5)
    ddim = gen.generate([[5, 6, 7]], seed=7, sampler="ddim", eta=0.0, **kw)[0].images[0]
    assert torch.isfinite(ddim).all() and not torch.allclose(ddim, a, atol=1e-3)
    ddim_cached, ddim_full = both(gen, [[5, 6, 7]], sampler="ddim", **kw)
    assert_same(ddim_cached, ddim_full)


def test_bf16_generation_runs(folder):
    g16 = TransfusionGenerator.from_folder(folder, dtype="bf16")
    assert next(g16.model.parameters()).dtype == torch.bfloat16
    res = g16.generate([5, 6, 7], mode="interleaved", max_new_tokens=3, steps=STEPS)[0]  # one prompt of ids
    assert len(res.tokens) == 3
    img = g16.generate([[5, 6, 7]], mode="image", steps=STEPS)[0].images[0]
    assert img.dtype == torch.float32 and torch.isfinite(img).all()


def test_samplers_share_the_training_schedule(gen):
    train = make_scheduler(gen.diffusion).alphas_cumprod
    for kind in ("ddpm", "ddim"):
        s = make_sampler(gen.diffusion, kind, 250)
        assert torch.equal(s.alphas_cumprod, train) and len(s.timesteps) == 250 and not s.config.clip_sample
    with pytest.raises(ValueError, match="diffusion steps"):
        make_sampler(gen.diffusion, "ddpm", 0)


def test_image_to_caption_from_latent_and_from_file(gen, tmp_path):
    cfg = gen.cfg
    cached, full = both(gen, [[ImagePart(latent=latent(1, cfg))], [latent(2, cfg), [20, 21]]],
                        mode="caption", max_new_tokens=6, temperature=0.0)
    assert_same(cached, full)
    assert cached[0].tokens and not cached[0].images and gen.cfg.tokens.boi not in cached[0].tokens
    pixels = (np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    assert gen.encode_image(str(tmp_path / "pic.png")).shape == (4, 8, 8)
    res = gen.generate(["<|image:%s|> a photo of" % (tmp_path / "pic.png")], mode="caption", max_new_tokens=4)
    assert len(res[0].tokens) == 4


def test_interleaved_rows_diverge_and_still_match_recompute(gen, monkeypatch):
    """Row 0 samples BOI on its 2nd token (diffusion while row 1 keeps writing), then resumes text."""
    t = gen.cfg.tokens
    real = generate_mod.sample_tokens
    calls = {"n": 0}

    def forced(logits, gens, *args):
        logits[:, t.boi] = float("-inf")  # images only where forced, whatever the weights prefer
        out = real(logits, gens, *args)
        calls["n"] += 1
        if calls["n"] == 2 and len(out) == 2:
            out[0] = t.boi
        return out

    monkeypatch.setattr(generate_mod, "sample_tokens", forced)
    prompts = [[5, 6, ImagePart(latent=latent(3, gen.cfg)), 7], [8, 9, 10]]
    kw = dict(mode="interleaved", max_new_tokens=6, max_images=1, steps=STEPS, cfg_scale=2.0, temperature=0.0)
    cached = gen.generate(prompts, use_cache=True, **kw)
    calls["n"] = 0
    full = gen.generate(prompts, use_cache=False, **kw)
    assert_same(cached, full)
    toks = cached[0].tokens
    assert toks[1] == t.boi and toks[2] == t.eoi and len(cached[0].images) == 1 and len(toks) > 3
    assert not cached[1].images


def test_prompt_errors(gen, folder, tmp_path):
    with pytest.raises(PromptError, match="more than the model's context of 64"):
        gen.generate([list(range(10, 10 + SEQ))])
    with pytest.raises(PromptError, match=r"context of 64"):  # the image's 16 patches do not fit
        gen.generate([list(range(10, 10 + SEQ - 17))], mode="image")
    with pytest.raises(PromptError, match=r"unknown special token '<\|foo\|>'"):
        gen.generate(["hello <|foo|> world"])
    with pytest.raises(PromptError, match="unknown special token"):
        gen.generate(["<|eoi|>"])
    with pytest.raises(PromptError, match="only end a prompt"):
        gen.generate([[5, gen.cfg.tokens.boi, 6]])
    with pytest.raises(PromptError, match="outside the vocabulary"):
        gen.generate([[5, 100000]])
    with pytest.raises(PromptError, match="caption mode needs an image"):
        gen.generate([[5, 6]], mode="caption")
    with pytest.raises(PromptError, match="latent shape"):
        gen.generate([[torch.zeros(3, 8, 8)]])
    no_tok = TransfusionGenerator(gen.model, gen.diffusion)
    with pytest.raises(PromptError, match="no tokenizer"):
        no_tok.generate(["some text"])
    with pytest.raises(InferenceFolderError, match="does not exist"):
        TransfusionGenerator.from_folder(tmp_path / "missing")


def test_generate_cli_writes_pngs_grid_and_results(folder, tmp_path, capsys):
    out = tmp_path / "gen"
    args = [str(folder), "--prompt", "a photo of", "--prompt-ids", "5,6,7", "--mode", "image", "--steps", "3",
            "--cfg-scale", "2", "--out", str(out)]
    assert generate_main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    files = [f for row in summary["rows"] for f in row["images"]]
    assert len(files) == 2 and all(f.endswith(".png") for f in files)
    with Image.open(files[0]) as img:
        assert img.size == (16, 16)
    assert (out / "grid.png").is_file() and "grid:" in capsys.readouterr().out
    assert generate_main([str(folder), "--prompt", "red", "--max-new-tokens", "3", "--temperature", "0",
                          "--out", str(tmp_path / "t")]) == 0
    assert "(length)" in capsys.readouterr().out
    assert generate_main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err
    assert generate_main([str(folder), "--prompt", "<|bogus|>", "--out", str(tmp_path / "t")]) == 2
    assert "unknown special token" in capsys.readouterr().err
