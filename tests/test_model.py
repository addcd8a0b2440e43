"""The Transfusion network: size at 7B, gradient flow, loss placement, mask behaviour end to end."""

import contextlib
import math

import numpy as np
import pytest
import torch

from model import DiffusionConfig, NoiseSchedule, Objective, TransfusionModel, transfusion_loss
from config import load_config
from trainer.documents import Document, ImageSegment
from trainer.packing import SequencePacker, collate
from tests.conftest import REPO


@pytest.mark.parametrize("codec, expected", [("linear", 7.0e9), ("unet", 7.0e9 + 0.27e9)])
def test_7b_parameter_count_on_meta_device(codec, expected):
    cfg = load_config(REPO / "configs" / "7b.yaml", [f"model.patch_codec={codec}", "data.source=synthetic"]).model
    with torch.device("meta"):
        model = TransfusionModel(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    n = model.num_params()
    assert abs(n - expected) / expected < 0.05, f"{n / 1e9:.3f}B vs {expected / 1e9:.2f}B"
    if codec == "unet":
        unet = n - model.num_params(exclude=("patch_",))
        assert abs(unet - 0.27e9) / 0.27e9 < 0.1, f"U-Net blocks {unet / 1e9:.3f}B"


def small_batch(cfg, seed=0):
    """Two rows: caption+image, image-first, text, and padding."""
    rng = np.random.default_rng(seed)
    C, s, P = cfg.latent_channels, cfg.latent_size, cfg.patches_per_image
    packer = SequencePacker(48, P, cfg.tokens, max_waiting=0)
    ids = lambda n: rng.integers(10, cfg.vocab_size, size=n)  # noqa: E731
    lat = lambda: torch.from_numpy(rng.standard_normal((C, s, s)).astype(np.float32))  # noqa: E731
    packer.add(Document([ids(5), ImageSegment(lat(), 1000), ids(2)]))
    packer.add(Document([ids(1), ImageSegment(lat(), 500), ids(6)]))
    packer.add(Document([ids(30)]))
    packer.add(Document([ids(3), ImageSegment(lat(), 1000), ids(2)]))
    rows = packer.pop_rows(len(packer.ready)) + [packer.row]
    return collate(rows, (C, s, s))


@pytest.fixture(params=["linear", "unet"])
def model_and_cfg(request, tiny_cfg):
    cfg = tiny_cfg.model
    cfg.patch_codec = request.param
    torch.manual_seed(0)
    return TransfusionModel(cfg), cfg


def test_every_parameter_gets_gradient(model_and_cfg):
    model, cfg = model_and_cfg
    batch = small_batch(cfg)
    batch.check()
    losses = Objective(DiffusionConfig(loss_weight=5.0))(model, batch, step=0, micro=0)
    losses.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert math.isclose(losses.total.item(), losses.lm.item() + 5.0 * losses.diffusion.item(), rel_tol=1e-6)


def test_losses_read_only_their_own_positions(model_and_cfg):
    """d(L_LM)/dh is zero at image patches; d(L_DDPM)/dh is zero everywhere but image patches."""
    model, cfg = model_and_cfg
    batch = small_batch(cfg)
    noisy, t, noise = NoiseSchedule(DiffusionConfig()).sample_training_inputs(batch.latents, batch.image_max_t)
    h, skips = model.embed(batch.tokens, batch.is_image, noisy, t)
    h = h.detach().requires_grad_(True)
    out = model.decode(h, batch.is_image, t, [s.detach() for s in skips])
    losses = transfusion_loss(out, batch.text_targets, noise, 5.0)
    g_lm, = torch.autograd.grad(losses.lm, h, retain_graph=True)
    g_diff, = torch.autograd.grad(losses.diffusion, h)
    has_target = batch.text_targets != -100
    assert g_lm[batch.is_image].abs().max() == 0 and g_lm[has_target].abs().sum(-1).gt(0).all()
    assert g_diff[~batch.is_image].abs().max() == 0 and g_diff[batch.is_image].abs().sum() > 0


def test_attention_pattern_end_to_end(tiny_cfg):
    """Perturb one input and see which outputs move: causal text, bidirectional images, no leaks."""
    cfg = tiny_cfg.model
    torch.manual_seed(0)
    model = TransfusionModel(cfg).eval()
    b = small_batch(cfg)
    t = torch.full((b.num_images,), 10)
    noisy = b.latents.clone()

    def run(tokens, latents):
        return model(tokens, b.position_ids, b.kv_lo, b.kv_hi, b.is_image, latents, t).logits[0]

    base = run(b.tokens, noisy)
    # Row 0 = [doc0: 5 ids, BOI, 16 patches, EOI, 2 ids][doc1: 1 id, BOI, patches, EOI, ...]
    first = b.image_slots[0, 1].item()
    P = cfg.patches_per_image
    changed = lambda new: (new - base).abs().amax(-1) > 1e-6  # noqa: E731

    tok = b.tokens.clone()
    tok[0, 2] += 1  # a caption token of doc 0
    moved = changed(run(tok, noisy))
    assert not moved[:2].any() and moved[2:first + P + 3].all()  # causal; all later doc-0 positions
    assert not moved[first + P + 3 :].any()  # doc 1 never sees doc 0

    lat = noisy.clone()
    lat[0, :, -1, -1] += 1.0  # the last patch of image 0
    moved = changed(run(b.tokens, lat))
    assert moved[first : first + P].all()  # every patch of that image sees it (bidirectional)
    assert not moved[: first].any()  # the caption before the image does not
    assert not moved[first + P + 3 :].any()


def test_cosine_schedule_matches_closed_form():
    schedule = NoiseSchedule(DiffusionConfig(num_timesteps=1000, schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar, prod = [], 1.0
    for t in range(1000):
        prod *= 1 - min(1 - f(t + 1) / f(t), 0.999)
        abar.append(prod)
    assert torch.allclose(schedule.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-5)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    xt = schedule.q_sample(x0, t, eps)
    a = torch.tensor(abar, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)


def test_noise_limit_respected():
    schedule = NoiseSchedule(DiffusionConfig())
    x0 = torch.zeros(4000, 1, 1, 1)
    max_t = torch.tensor([500, 1000]).repeat(2000)
    _, t, _ = schedule.sample_training_inputs(x0, max_t, torch.Generator().manual_seed(0))
    assert t[max_t == 500].max() < 500 and t[max_t == 500].max() > 480
    assert t[max_t == 1000].max() > 980 and t.min() >= 0


def test_unet_codec_is_timestep_conditioned(tiny_cfg):
    cfg = tiny_cfg.model
    cfg.patch_codec = "unet"
    torch.manual_seed(0)
    model = TransfusionModel(cfg)
    x = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    p1, skips = model.patch_encoder(x, torch.tensor([1, 1]))
    p2, _ = model.patch_encoder(x, torch.tensor([900, 900]))
    assert p1.shape == (2, cfg.patches_per_image, cfg.d_model) and not torch.allclose(p1, p2)
    is_image = torch.ones(2, cfg.patches_per_image, dtype=torch.bool)
    eps = model.patch_decoder(p1, is_image, torch.tensor([1, 1]), skips)
    assert eps.shape == x.shape


def test_batch_without_images_still_reaches_every_parameter(model_and_cfg):
    """Codecs run on empty image batches: sharded layouts need every rank in their collectives."""
    model, cfg = model_and_cfg
    B, S = 2, 16
    tokens = torch.randint(10, cfg.vocab_size, (B, S))
    spans = torch.zeros(B, S, dtype=torch.int32), torch.arange(1, S + 1, dtype=torch.int32).expand(B, S)
    empty = torch.zeros(0, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    out = model(tokens, torch.arange(S).expand(B, S), *spans, torch.zeros(B, S, dtype=torch.bool), empty,
                torch.zeros(0, dtype=torch.long))
    assert out.noise_pred.shape == empty.shape
    transfusion_loss(out, tokens, empty, 5.0).total.backward()
    assert all(p.grad is not None for p in model.parameters())


def _old_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The LM term as it was computed before chunking: fp32 copy of all logits, mean CE."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_lm_loss_equals_old_formula(model_and_cfg, dtype, chunk):
    """Head on text targets only, chunked and checkpointed: same loss and gradients as full logits."""
    from model.losses import lm_loss_sum

    model, cfg = model_and_cfg
    batch = small_batch(cfg)
    noisy = batch.latents
    t = torch.zeros(batch.num_images, dtype=torch.long)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with ctx:
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
        n = int((batch.text_targets != -100).sum())
        new = lm_loss_sum(out, batch.text_targets, chunk=chunk) / n
    new_grads = torch.autograd.grad(new, [model.output.weight, model.layers["0"].attention.wq.weight])
    with ctx:
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, noisy, t)
        old = _old_lm_loss(out.logits, batch.text_targets)
    old_grads = torch.autograd.grad(old, [model.output.weight, model.layers["0"].attention.wq.weight])
    assert out.hidden.shape[:2] == batch.tokens.shape
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    for a, b in zip(new_grads, old_grads):
        # Under bf16 autocast weight gradients are rounded to bf16 per chunk (and summed over other rows).
        atol = 1e-7 if dtype == "fp32" else 1e-2 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_logits_at_chosen_positions_match_full_logits(model_and_cfg):
    model, cfg = model_and_cfg
    batch = small_batch(cfg)
    t = torch.zeros(batch.num_images, dtype=torch.long)
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, batch.kv_lo, batch.kv_hi, batch.is_image, batch.latents, t)
        full = out.head(out.hidden)
        torch.testing.assert_close(out.last_logits(), full[:, -1])
        torch.testing.assert_close(out.logits_at(~batch.is_image), full[~batch.is_image])
        assert out._logits is None  # nothing above computed every position's logits
        torch.testing.assert_close(out.logits, full)


def test_kv_cache_writes_only_new_positions():
    """Appending and frozen (diffusion) steps write into a preallocated buffer: the prefix is never
    copied again, buffers grow by doubling, and the returned keys equal the concatenation."""
    from model.layers import KVCache

    torch.manual_seed(0)
    cache = KVCache()
    layer = cache.layer("0")
    prefix_k, prefix_v = torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8)
    layer.extend(prefix_k, prefix_v)
    cache.frozen = True
    buf_ptr = None
    for _ in range(3):  # denoising steps: same prefix, new noisy patches each time
        nk, nv = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
        k, v = layer.extend(nk, nv)
        torch.testing.assert_close(k, torch.cat([prefix_k, nk], 1))
        torch.testing.assert_close(v, torch.cat([prefix_v, nv], 1))
        buf_ptr = buf_ptr or k.data_ptr()
        assert k.data_ptr() == buf_ptr == cache._bufs["0"][0].data_ptr()  # a view: the prefix is not copied
    assert cache.length == 40
    cache.frozen = False
    allocations = set()
    for i in range(200):  # token-by-token generation
        layer.extend(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
        allocations.add(cache._bufs["0"][0].data_ptr())
    assert cache.length == 240 and len(allocations) <= 5
    torch.testing.assert_close(cache.keys["0"][:, :40], prefix_k)
    # A tensor assigned from outside (stacking / row selection) is adopted and copied on the next write.
    sub = cache.map(lambda t: t[1:2, 10:])
    k, _ = sub.layer("0").extend(torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8))
    torch.testing.assert_close(k[:, :-1], cache.keys["0"][1:2, 10:])
    assert cache.length == 240 and sub.length == 231
