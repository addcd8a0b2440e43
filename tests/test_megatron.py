"""Megatron-LM indexed datasets as text streams, and conversion to and from our MDS text shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core.datasets.indexed_dataset")
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from data_prep.megatron_convert import main as convert  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import keys_of, recorded_loaders, write_shards  # noqa: E402
from trainer.checkpoint import checkpoint_dirs  # noqa: E402
from trainer.data import build_loader, document_builder  # noqa: E402
from trainer.documents import ImageSegment  # noqa: E402
from trainer.streaming import StreamingSource  # noqa: E402

BOS, EOS = 1, 2  # tiny.yaml's special tokens


def build_corpus(prefix, docs: list[list[int]], dtype=np.uint16) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def corpus_docs(n: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(10, 1900, size=int(rng.integers(3, 60))).tolist() for _ in range(n)]
    docs[3] = []  # an empty document
    docs[5] = rng.integers(10, 1900, size=400).tolist()  # longer than a 128-position row
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    write_shards(root, n_images=30, n_texts=10)
    docs = corpus_docs()
    build_corpus(root / "corpus" / "text_document", docs)
    return root, docs


def overrides(root, *extra, add_eos=False):
    return [
        "data.source=streaming", "logging.wandb=disabled", "train.seq_len=128", "model.max_seq_len=128",
        f"data.streams=[{{path: {root / 'images'}, kind: image, proportion: 1}}, "
        f"{{path: {root / 'corpus' / 'text_document'}, kind: megatron, proportion: 1, tokenizer: test-bpe-2000, "
        f"add_eos: {str(add_eos).lower()}}}]",
        *extra,
    ]


def megatron_docs(source: StreamingSource, n: int) -> list[list[int]]:
    """The next n text documents the packer would receive, as token lists."""
    out = []
    while len(out) < n:
        doc = next(source)
        if not any(isinstance(s, ImageSegment) for s in doc.segments):
            out.append(np.concatenate(doc.segments).tolist())
    return out


@pytest.mark.parametrize("add_eos", [False, True])
def test_packer_receives_the_corpus_documents_in_order_with_the_bos_eos_rule(data, add_eos):
    root, docs = data
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(root, "data.shuffle=false", add_eos=add_eos))
    source = StreamingSource(cfg, document_builder(cfg))
    want = [[BOS, *d] + ([EOS] if add_eos else []) for d in docs if d]
    assert megatron_docs(source, len(want)) == want  # the empty document is skipped
    assert source.datasets[1].empty == 1


def test_training_on_a_megatron_stream_mixed_with_images(data, tmp_path):
    from trainer.train import train

    root, _ = data
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(
        root, "train.steps=3", "train.batch_size=2", f"train.output_dir={tmp_path}", "checkpoint.interval=3"))
    history = train(cfg)
    assert len(history) == 3 and all(np.isfinite(h["lm_loss"]) and h["lm_loss"] > 0 for h in history)
    state = torch.load(checkpoint_dirs(tmp_path / "checkpoints")[-1] / "train_state.pt", weights_only=True)
    assert state["config"]["data"]["streams"][1]["tokenizer"] == "test-bpe-2000"  # recorded with the run


def test_resume_and_elastic_resume_read_each_document_once(data):
    root, docs = data
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(root))
    n = sum(1 for d in docs if d)
    whole = megatron_docs(StreamingSource(cfg, document_builder(cfg)), n)
    first = StreamingSource(cfg, document_builder(cfg))
    head = megatron_docs(first, 7)
    again = StreamingSource(cfg, document_builder(cfg))
    again.load_state_dict(first.state_dict())
    assert head + megatron_docs(again, n - 7) == whole  # exact resume: same documents, same order

    taken = []  # (stream, epoch, key) of every sample read
    old = recorded_loaders(cfg, 2, taken)
    for loader, steps in zip(old, (2, 3)):
        for _ in range(steps):
            next(loader)
    states = [loader.state_dict() for loader in old]
    new = recorded_loaders(cfg, 3, taken)
    for loader in new:
        assert "0 to be read again" in loader.load_elastic_state(states)
    while min(ld.source.cursors[1].epoch for ld in new) < 1:
        for loader in new:
            next(loader)
    assert sorted(keys_of(taken, 1)) == sorted(f"text_document:{d + 1}" for d in range(len(docs)))


def test_sigkill_and_resume_continue_with_the_same_documents(data, tmp_path):
    root, _ = data

    def launch(out, steps):
        cmd = [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
               *overrides(root), "train.batch_size=2", "logging.log_every=1", "model.n_layers=2",
               f"train.output_dir={out}", f"train.steps={steps}", "checkpoint.interval=2", "train.device=cpu"]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    assert launch(tmp_path / "ref", 8).wait(timeout=300) == 0
    run = tmp_path / "run"
    first = launch(run, 8)
    while not checkpoint_dirs(run / "checkpoints") and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    second = launch(run, 8)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0 and "resuming at step" in out, err[-2000:]
    assert losses(run) == losses(tmp_path / "ref")  # same documents, so bitwise the same losses


def test_mds_to_megatron_to_mds_round_trip_is_identical(tmp_path):
    from streaming import StreamingDataset

    from examples.tiny_assets import WORDS, make_tiny_tokenizer
    from data_prep.tokenize_text import main as tokenize

    tok = make_tiny_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(3)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 40))))
                                                      for _ in range(50)))
    tokenize(["--input", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "mds"), "--tokenizer", str(tok)])
    convert(["from-mds", str(tmp_path / "mds"), "--prefix", str(tmp_path / "mega" / "doc")])
    convert(["to-mds", str(tmp_path / "mega" / "doc"), "--out", str(tmp_path / "back"), "--tokenizer", str(tok)])

    def documents(path):
        ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
        return [np.asarray(ds[i]["tokens"]).tolist() for i in range(ds.num_samples)]

    original = documents(tmp_path / "mds")
    assert len(original) == 50 and documents(tmp_path / "back") == original


def test_bad_corpora_get_one_line_errors(data, tmp_path):
    root, _ = data
    cfg_for = lambda prefix: load_config(REPO / "configs" / "tiny.yaml", [  # noqa: E731
        "data.source=streaming", "logging.wandb=disabled",
        f"data.streams=[{{path: {prefix}, kind: megatron, tokenizer: t}}]"])
    oov = tmp_path / "oov"
    build_corpus(oov, [[5, 6], [7, 2500]])
    with pytest.raises(ConfigError, match=rf"Megatron corpus '{oov}' holds token ids 5..2500 but model.vocab_size=2000"):
        build_loader(cfg_for(oov))
    short = tmp_path / "short"
    build_corpus(short, [[5, 6, 7, 8], [9, 10]])
    os.truncate(f"{short}.bin", 6)
    with pytest.raises(ConfigError, match=r"short.bin has 6 bytes but its index needs 12"):
        build_loader(cfg_for(short))
    (tmp_path / "cut.bin").write_bytes(open(f"{short}.bin", "rb").read())
    (tmp_path / "cut.idx").write_bytes(open(f"{short}.idx", "rb").read()[:20])
    with pytest.raises(ConfigError, match=r"cut.idx cannot be read"):
        build_loader(cfg_for(tmp_path / "cut"))
    os.remove(f"{short}.idx")
    with pytest.raises(ConfigError, match=r"short.idx missing; `path` is the prefix"):
        cfg_for(short)  # at config validation, before anything is built
