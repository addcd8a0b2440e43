"""checkpoint.init_from: a run starts from a training checkpoint, an inference folder or a Hugging Face
Llama folder, on one process and on 2-rank layouts, with the source's weights; mismatches are one
line; a run with a checkpoint of its own resumes it instead."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from config import ConfigError
from tests.conftest import REPO
from tests.helpers import train_and_checkpoint
from tests.parallel_worker import BASE, layout_config, spawn_jobs
from trainer.init_weights import init_from
from trainer.preemption import REQUEUE_EXIT_CODE
from trainer.train import make_engine

BACKBONE = ("tok_embeddings.", "layers.", "norm.", "output.")


def fine_tune_config(run, tmp_path, source, *fresh: str):
    cfg = copy.deepcopy(run["cfg"])
    cfg.train.output_dir = str(tmp_path / "fine-tune")
    cfg.checkpoint.init_from, cfg.checkpoint.init_fresh = str(source), list(fresh)
    return cfg


@pytest.mark.parametrize("kind", ["checkpoint", "inference", "hf_llama"])
def test_init_from_each_source_gives_the_source_weights(run, folder, tmp_path, kind):
    source = {"checkpoint": run["ckpt"], "inference": folder, "hf_llama": folder.parent / "hf"}[kind]
    cfg = fine_tune_config(run, tmp_path, source)
    engine = make_engine(cfg)
    before = engine.full_state_dict()
    line = init_from(engine, cfg)
    got, want = engine.full_state_dict(), {k: v.detach() for k, v in run["model"].state_dict().items()}
    loaded = {k for k in want if kind != "hf_llama" or k.startswith(BACKBONE)}
    assert all(torch.equal(got[k], want[k]) for k in loaded), [k for k in loaded if not torch.equal(got[k], want[k])]
    fresh = set(want) - loaded
    assert all(torch.equal(got[k], before[k]) for k in fresh)  # the codecs and timestep embedding, from Llama
    assert (kind == "hf_llama") == bool(fresh) and (f"{len(fresh)} start fresh" in line) == bool(fresh), line
    model, b = engine.parts[0].eval(), run["batch"]
    if kind == "hf_llama":  # text only: what Llama has
        ids = torch.randint(5, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(40).expand(2, 40)
        t = model.cfg.latent_channels, model.cfg.latent_size, model.cfg.latent_size
        args = (ids, pos, torch.zeros(2, 40, dtype=torch.int32), (pos + 1).to(torch.int32),
                torch.zeros(2, 40, dtype=torch.bool), torch.zeros(0, *t), torch.zeros(0, dtype=torch.long))
    else:  # a packed batch with images, at one timestep
        t = torch.full((len(b.latents),), 500)
        args = (b.tokens, b.position_ids, b.kv_lo, b.kv_hi, b.is_image, b.latents, t)
    with torch.no_grad():
        ours, theirs = model(*args), run["model"](*args)
    assert torch.equal(ours.logits, theirs.logits)


def test_mismatches_are_one_line_and_fresh_weights_must_be_named(run, folder, tmp_path):
    cfg = fine_tune_config(run, tmp_path, folder)
    cfg.model.vocab_size += 8
    with pytest.raises(ConfigError) as e:
        init_from(make_engine(cfg), cfg)
    msg = str(e.value)
    assert "\n" not in msg and "another model.vocab_size or d_model?" in msg and "tok_embeddings.weight" in msg
    assert "checkpoint.init_fresh=[" in msg
    cfg.checkpoint.init_fresh = ["tok_embeddings.weight", "output.weight"]  # a new vocabulary: start those fresh
    assert "2 start fresh (output.weight, tok_embeddings.weight)" in init_from(make_engine(cfg), cfg)
    cfg = fine_tune_config(run, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="is neither a training checkpoint step folder"):
        init_from(make_engine(cfg), cfg)


def _init_and_gather(cfg, env, source):
    cfg.checkpoint.init_from = source
    engine = make_engine(cfg, env)
    init_from(engine, cfg)
    return engine.full_state_dict()


def test_each_source_on_two_rank_layouts(tmp_path):
    """A 1-process checkpoint, its inference folder and its HF export into FSDP2, TP2 and PP2: DCP
    reshards the checkpoint, the full tensors are sliced; the gathered weights are the source's."""
    from inference.convert import convert_checkpoint

    cfg = layout_config([])
    engine, _, ckpt = train_and_checkpoint(cfg, tmp_path / "src", 1)
    want = engine.full_state_dict()
    convert_checkpoint(ckpt, tmp_path / "inf", hf_llama=tmp_path / "hf")
    sources = {"ckpt": str(ckpt), "inf": str(tmp_path / "inf"), "hf": str(tmp_path / "hf")}
    layouts = {"fsdp": ["parallel.dp_shard=2"], "tp": ["parallel.tp=2"], "pp": ["parallel.pp=2"]}
    jobs = [(f"{layout}-{src}", overrides, path) for layout, overrides in layouts.items()
            for src, path in sources.items() if layout == "fsdp" or src == "ckpt"]
    for name, ranks in spawn_jobs(2, _init_and_gather, jobs, str(tmp_path)).items():
        got = {}
        for rank in ranks:  # a pipeline rank holds its own stages
            assert "error" not in rank, rank.get("error")
            got.update(rank)
        assert got.keys() == want.keys(), name
        loaded = [k for k in want if not name.endswith("hf") or k.startswith(BACKBONE)]
        assert all(torch.equal(got[k], want[k]) for k in loaded), name


def test_a_preempted_fine_tune_resumes_its_own_checkpoint_like_an_uninterrupted_one(tmp_path):
    """The preemption comes through the launcher's signal file (as in slurm/), so it lands after step 1."""
    cfg = layout_config([])
    _, _, ckpt = train_and_checkpoint(cfg, tmp_path / "src", 1)

    def fine_tune(out, **env):
        cmd = [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"), *BASE,
               f"train.output_dir={out}", f"checkpoint.init_from={ckpt}", "checkpoint.enabled=true",
               "checkpoint.interval=0", "train.steps=4", "logging.log_every=1"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        assert proc.returncode in (0, REQUEUE_EXIT_CODE), proc.stderr[-2000:]
        return proc.stdout

    assert f"from training checkpoint {ckpt}" in fine_tune(tmp_path / "ref")
    (tmp_path / "signals").write_text("USR1\n")
    out = fine_tune(tmp_path / "ft", TRANSFUSION_SIGNAL_FILE=str(tmp_path / "signals"))
    assert "initialised" in out and (tmp_path / "ft" / "REQUEUE").read_text() == "1\n"
    out = fine_tune(tmp_path / "ft")
    assert "checkpoint.init_from ignored: resuming this run's own" in out and "resuming at step 1" in out
    assert losses(tmp_path / "ft") == losses(tmp_path / "ref") and sorted(losses(tmp_path / "ref")) == [1, 2, 3, 4]


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
