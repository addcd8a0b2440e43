"""Pipeline stages are copies of the plain model with modules removed (parallel/pipeline.py): chained by
hand on one process they compute exactly what the plain model computes, under the plain names."""

import numpy as np
import pytest
import torch

from model import NoiseSchedule, TransfusionModel
from parallel.pipeline import split_layers, stage_copy, stage_module
from tests.helpers import one_thread  # noqa: F401  (autouse: one thread in this module)
from trainer.documents import Document, ImageSegment
from trainer.packing import SequencePacker, collate

N_STAGES = 3


def _batch(cfg):
    """Two rows with three images (one image-first) and a text-only document."""
    rng = np.random.default_rng(0)
    C, s, P = cfg.latent_channels, cfg.latent_size, cfg.patches_per_image
    packer = SequencePacker(48, P, cfg.tokens, max_waiting=0)
    ids = lambda n: rng.integers(10, cfg.vocab_size, size=n)  # noqa: E731
    lat = lambda: torch.from_numpy(rng.standard_normal((C, s, s)).astype(np.float32))  # noqa: E731
    packer.add(Document([ids(5), ImageSegment(lat(), 1000), ids(2)]))
    packer.add(Document([ImageSegment(lat(), 500), ids(6)]))
    packer.add(Document([ids(30)]))
    packer.add(Document([ids(3), ImageSegment(lat(), 1000), ids(2)]))
    return collate(packer.pop_rows(len(packer.ready)) + [packer.row], (C, s, s))


@pytest.fixture(params=["linear", "unet"])
def setup(request, tiny_cfg):
    cfg = tiny_cfg.model
    cfg.patch_codec = request.param
    torch.manual_seed(0)
    model = TransfusionModel(cfg)
    batch = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    noisy, t, noise = NoiseSchedule(tiny_cfg.diffusion).sample_training_inputs(batch.latents, batch.image_max_t, gen)
    meta = dict(position_ids=batch.position_ids, kv_lo=batch.kv_lo, kv_hi=batch.kv_hi, is_image=batch.is_image,
                noisy_latents=noisy, timesteps=t)
    with torch.no_grad():
        ref = model(batch.tokens, **meta)
    return model, batch, meta, noise, ref


def _copies(model):
    ranges = split_layers(model.cfg.n_layers, N_STAGES)
    return [stage_copy(model, r, i == 0, i == N_STAGES - 1) for i, r in enumerate(ranges)]


def test_stage_copies_chained_by_hand_equal_plain_model(setup):
    model, batch, meta, _, ref = setup
    s0, s1, s2 = _copies(model)
    assert (s0.is_first, s0.is_last, s1.is_first, s1.is_last, s2.is_first, s2.is_last) == (
        True, False, False, False, False, True)
    with torch.no_grad():
        h, skips = s0(batch.tokens, **meta)  # the plain forward of a copy without the output modules
        h, skips = s1(h, **meta, skips=skips)
        out = s2(h, **meta, skips=skips)
    assert torch.equal(out.hidden, ref.hidden)
    assert torch.equal(out.noise_pred, ref.noise_pred)
    assert len(skips) == (len(model.cfg.unet_channels) if model.cfg.patch_codec == "unet" else 0)


def test_pipeline_forward_pads_skips_and_carries_noise(setup):
    model, batch, meta, noise, ref = setup
    capacity = batch.num_images + 3
    ranges = split_layers(model.cfg.n_layers, N_STAGES)
    stages = [stage_module(model, r, i == 0, i == N_STAGES - 1, capacity) for i, r in enumerate(ranges)]
    outputs = (batch.tokens,)
    with torch.no_grad():
        for i, stage in enumerate(stages):
            outputs = stage(*outputs, **meta, noise=noise)  # as PipelineStage calls it
            if i < N_STAGES - 1:  # static shapes between stages: h and skips padded to the capacity
                assert outputs[0].shape == (*batch.tokens.shape, model.cfg.d_model)
                assert all(s.shape[0] == capacity for s in outputs[1:])
    hidden, noise_pred, noise_out = outputs
    assert torch.equal(hidden, ref.hidden)
    assert torch.equal(noise_pred, ref.noise_pred)
    assert noise_out is noise


def test_stage_parameters_partition_the_plain_names(setup):
    model = setup[0]
    full = dict(model.named_parameters())
    names = [[n for n, _ in c.named_parameters()] for c in _copies(model)]
    flat = [n for stage in names for n in stage]
    assert len(flat) == len(set(flat)) and set(flat) == set(full)  # each name on exactly one stage
    assert "layers.3.attention.wq.weight" in names[2] and "tok_embeddings.weight" in names[0]
    layer_ids = [{n.split(".")[1] for n in stage if n.startswith("layers.")} for stage in names]
    assert layer_ids == [{"0", "1"}, {"2"}, {"3"}]
    for copy in _copies(model):  # copies, not views of the model's storage
        for n, p in copy.named_parameters():
            assert p.data_ptr() != full[n].data_ptr() and torch.equal(p, full[n])


def test_stage_copy_of_meta_model_stays_on_meta(tiny_cfg):
    with torch.device("meta"):
        model = TransfusionModel(tiny_cfg.model)
    stage = stage_copy(model, [2, 3], is_first=False, is_last=True)
    assert list(stage.layers.keys()) == ["2", "3"]
    assert stage.tok_embeddings is None and stage.patch_encoder is None and stage.output is not None
    assert all(p.is_meta for p in stage.parameters())
    assert model.tok_embeddings is not None and len(model.layers) == model.cfg.n_layers  # original untouched
