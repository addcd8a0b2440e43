"""Roles of a document's parts (the packed-batch contract): context text has no LM targets, a
condition image is read clean at t = 0 and carries no diffusion loss, and every layout trains such
documents as one process does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from config import DiffusionConfig, SpecialTokens
from model.batch import IGNORE_INDEX
from model.diffusion import NoiseSchedule
from model.losses import LossNorm, transfusion_loss
from model.transfusion import ModelOutput
from tests.parallel_worker import layout_config, merged, spawn_jobs
from tests.test_parallel import LOSS_RTOL, PARAM_ATOL, PARAM_RTOL
from trainer.documents import CONDITION, ContextText, Document, DocumentBuilder, ImageSegment
from trainer.packing import SequencePacker, collate, flatten_document

TOKENS = SpecialTokens()
P = 4  # patches per image


def edit_document(instruction=(20, 21, 22), answer=(30, 31)) -> Document:
    """BOS, the input image (a condition), the instruction (context), the edited image, an answer, EOS."""
    src, tgt = torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    return Document([np.array([TOKENS.bos]), ImageSegment(src, CONDITION), ContextText(np.array(instruction)),
                     ImageSegment(tgt, 1000), np.array([*answer, TOKENS.eos])])


def test_context_text_has_no_lm_targets_and_roles_reach_the_batch():
    flat = flatten_document(edit_document(), P, TOKENS)
    L = len(flat)
    assert L == 1 + (P + 2) + 3 + (P + 2) + 3 == edit_document().num_positions(P)
    instr = slice(1 + P + 2, 1 + P + 2 + 3)
    assert list(flat.tokens[instr]) == [20, 21, 22]
    predicted = {int(flat.tokens[i + 1]) for i in range(L - 1) if flat.targets[i] != IGNORE_INDEX}
    assert predicted.isdisjoint({20, 21, 22})  # no position learns to write the instruction
    assert {30, 31, TOKENS.eos, TOKENS.boi} <= predicted  # the answer, and the BOI that opens the edit
    assert flat.targets[instr.stop - 1] == TOKENS.boi  # the instruction's last token predicts BOI
    packer = SequencePacker(32, P, TOKENS)
    packer.add(edit_document())
    packer.flush()
    batch = collate(packer.pop_rows(1), (4, 4, 4))
    batch.check()
    assert batch.image_max_t.tolist() == [CONDITION, 1000] and batch.generated.tolist() == [False, True]
    first = int(batch.image_slots[0, 1])  # the condition image is still bidirectional inside itself
    assert batch.kv_hi[0, first:first + P].tolist() == [first + P] * P


def test_a_condition_image_is_clean_at_t0_and_the_other_draws_do_not_depend_on_roles():
    sched = NoiseSchedule(DiffusionConfig())
    x0 = torch.randn(3, 4, 4, 4)
    x_t, t, noise = sched.sample_training_inputs(x0, torch.tensor([1000, CONDITION, 500]),
                                                 torch.Generator().manual_seed(0))
    ref_x, ref_t, ref_noise = sched.sample_training_inputs(x0, torch.tensor([1000, 1000, 500]),
                                                           torch.Generator().manual_seed(0))
    assert t[1] == 0 and torch.equal(x_t[1], x0[1])
    assert torch.equal(t[[0, 2]], ref_t[[0, 2]]) and torch.equal(x_t[[0, 2]], ref_x[[0, 2]])
    assert torch.equal(noise, ref_noise)


def test_a_condition_image_carries_no_diffusion_loss():
    noise, pred = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    out = ModelOutput(pred, torch.zeros(1, 1, 8), torch.nn.Linear(8, 10, bias=False))
    targets = torch.full((1, 1), IGNORE_INDEX)
    generated = torch.tensor([True, False, True])
    got = transfusion_loss(out, targets, noise, 1.0, generated=generated).diffusion
    want = transfusion_loss(ModelOutput(pred[[0, 2]], out.hidden, out.head), targets, noise[[0, 2]], 1.0).diffusion
    assert torch.equal(got, want)
    pred[1] += 100  # whatever the model predicts for the condition
    assert torch.equal(transfusion_loss(out, targets, noise, 1.0, generated=generated).diffusion, got)
    # With a step norm: this micro-batch's 2 generated images out of the step's 4.
    normed = transfusion_loss(out, targets, noise, 1.0, LossNorm(text_targets=1, images=4), generated=generated)
    assert torch.allclose(normed.diffusion, got * 2 / 4)


def _edit_pairs(self, caption_ids, latent, rng):  # DocumentBuilder.image_caption, for the layout test
    """Every pair as an edit: the latent as a condition, the caption as context, its mirror generated."""
    bos, eos = np.array([self.tokens.bos]), np.array([self.tokens.eos])
    return Document([bos, ImageSegment(latent, CONDITION), ContextText(np.asarray(caption_ids)),
                     ImageSegment(latent.flip(-1), self.recipe.num_timesteps), eos])


def edit_training(cfg, env=None) -> dict:
    """Train cfg.train.steps on edit documents (this process only: DocumentBuilder is patched here)."""
    from tests.parallel_worker import rank_steps
    from trainer.train import make_engine

    DocumentBuilder.image_caption = _edit_pairs
    engine = make_engine(cfg, env)
    results = rank_steps(engine, cfg, env)
    return {"losses": [r.loss for r in results], "diffusion": [r.diffusion_loss for r in results],
            "params": {k: v.detach().cpu().clone() for k, v in engine.full_state_dict().items()}}


LAYOUTS = {"fsdp2": ["parallel.dp_shard=2"], "tp2_sp": ["parallel.tp=2"], "pp2_1f1b": ["parallel.pp=2"]}


def test_every_layout_trains_edit_documents_as_one_process_does(tmp_path, monkeypatch):
    monkeypatch.setattr(DocumentBuilder, "image_caption", _edit_pairs)
    ref_cfg = layout_config([])
    ref_cfg.train.grad_accum *= 2  # the data-parallel layout's two ranks' micro-batches
    ref = edit_training(ref_cfg)
    ref_dp1 = edit_training(layout_config([]))
    assert all(d > 0 for d in ref["diffusion"])  # the generated images train
    results = spawn_jobs(2, edit_training, list(LAYOUTS.items()), str(tmp_path))
    for name, ranks in results.items():
        want = ref if name == "fsdp2" else ref_dp1
        for res in ranks:
            assert "error" not in res, res.get("error")
            assert res["losses"] == pytest.approx(want["losses"], rel=LOSS_RTOL), name
        params = merged(ranks, "params")
        for key, w in want["params"].items():
            torch.testing.assert_close(params[key], w, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=lambda m: f"{name} {key}: {m}")
