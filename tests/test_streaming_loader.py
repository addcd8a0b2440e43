"""Training-time data from MDS shards: token mixing, bit-exact latents, exact resume in a fresh process."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.helpers import batch_digest, keys_of, recorded_loaders, streaming_overrides, write_shards
from config import load_config
from trainer.data import build_loader

RESUME_SCRIPT = """
import pickle, sys
from trainer.data import build_loader
from config import load_config
from tests.helpers import batch_digest, streaming_overrides
from pathlib import Path
root, state_file, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = load_config("configs/tiny.yaml", streaming_overrides(root))
loader = build_loader(cfg)
loader.load_state_dict(pickle.load(open(state_file, "rb")))
print(" ".join(batch_digest(next(loader)) for _ in range(n)))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root)
    return root


def test_resume_in_fresh_process_matches_uninterrupted(shards, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(shards))
    loader = build_loader(cfg)
    first = [next(loader) for _ in range(5)]  # crosses the end of the image epoch
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(loader.state_dict()))
    expected = [batch_digest(next(loader)) for _ in range(4)]
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(shards), str(tmp_path / "state.pkl"), "4"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # the script imports tests.helpers: the checkout on the child's path, whatever the caller's environment
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == expected
    # Text and image positions are mixed 1:1 by tokens, within one document of each other.
    state = loader.state_dict()["source"]
    assert abs(state["positions"][0] - state["positions"][1]) <= 200
    assert all(b.num_images > 0 and b.num_text_tokens() > 0 for b in first)


def test_latent_means_are_bit_exact(shards):
    from streaming import StreamingDataset

    cfg = load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(
        shards, "data.sample_latents=false", "data.shuffle=false", "data.image_first_prob=0",
        "data.caption_dropout=0", "data.streams=[{path: " + str(shards / "images") + ", kind: image}]"))
    batch = next(build_loader(cfg))
    # The same shards read by an independent plain StreamingDataset (a separate cache folder view).
    ds = StreamingDataset(local=str(shards / "images"), shuffle=False, batch_size=1)
    stored = torch.stack([torch.from_numpy(np.array(ds[i]["latent_mean"])).float() for i in range(batch.num_images)])
    assert torch.equal(batch.latents, stored)


def test_shards_that_do_not_fit_the_model_are_refused(shards, tmp_path):
    (shards / "images" / "dataset_info.json").write_text('{"latent_shape": [8, 32, 32]}')
    try:
        cfg = load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(shards))
        with pytest.raises(Exception, match=r"latents of shape \[8, 32, 32\] but the model expects \[4, 8, 8\]"):
            build_loader(cfg)
    finally:
        (shards / "images" / "dataset_info.json").unlink()


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("big_shards")
    write_shards(root, n_images=240, n_texts=300, seed=1)
    return root


def test_ranks_read_disjoint_parts_covering_each_epoch(big_shards):
    """3 ranks in step: during epoch 0 of each stream they read every sample exactly once."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(big_shards, "data.shuffle_block=50"))
    taken = []
    loaders = recorded_loaders(cfg, 3, taken)
    while min(c.epoch for ld in loaders for c in ld.source.cursors) < 1:
        for loader in loaders:
            next(loader)
    for stream, (prefix, total) in enumerate((("img", 240), ("t", 300))):
        keys = keys_of(taken, stream)
        assert sorted(keys) == sorted(f"{prefix}{j}" for j in range(total))


def test_elastic_resume_on_more_ranks_reads_each_sample_once(big_shards):
    """2 ranks read 3 and 4 batches (stopping at different points of each stream); 3 new ranks
    continue from all their states to the end of epoch 0: every sample of it read exactly once."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", streaming_overrides(big_shards))
    taken = []
    old = recorded_loaders(cfg, 2, taken)
    for loader, n in zip(old, (3, 4)):
        for _ in range(n):
            next(loader)
    states = [loader.state_dict() for loader in old]
    assert all(c["epoch"] == 0 for s in states for c in s["source"]["streams"])
    new = recorded_loaders(cfg, 3, taken)
    for loader in new:
        report = loader.load_elastic_state(pickle.loads(pickle.dumps(states)))
        assert "0 to be read again" in report
    while min(c.epoch for ld in new for c in ld.source.cursors) < 1:
        for loader in new:
            next(loader)
    for stream, (prefix, total) in enumerate((("img", 240), ("t", 300))):
        assert sorted(keys_of(taken, stream)) == sorted(f"{prefix}{j}" for j in range(total))


def test_training_on_two_ranks_crosses_epochs_then_resumes_on_one(tmp_path):
    """The real launch path: torchrun FSDP(2) on shards whose 20 images last each rank about one step,
    so the ranks start new epochs at different moments (StreamingDataset's own iterator would block
    there, at its node-wide barrier); saved at step 6, one process resumes it and the data continues."""
    write_shards(tmp_path / "shards", n_images=20, n_texts=200, seed=2)
    common = [*streaming_overrides(tmp_path / "shards"), "model.n_layers=2", "train.batch_size=2",
              "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "checkpoint.interval=6",
              "logging.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    first = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "trainer.train", "--config", "configs/tiny.yaml",
         *common, "parallel.dp_shard=2", "train.steps=6"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    saved = [torch.load(f, weights_only=True)["loader"]["source"]["streams"][0]
             for f in sorted((tmp_path / "run" / "checkpoints" / "step_00000006").glob("rank_*.pt"))]
    assert len(saved) == 2 and all(s["epoch"] >= 3 for s in saved), saved
    second = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "configs/tiny.yaml", *common, "train.steps=7"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 6" in second.stdout
    assert "data-parallel ranks 2 -> 1: the data continues (image stream:" in second.stdout, second.stdout
