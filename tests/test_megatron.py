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
        "data.source=streaming", "logging.wandb=disabled", "eval.every=0", "train.seq_len=128", "model.max_seq_len=128",
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
        "data.source=streaming", "logging.wandb=disabled", "eval.every=0",
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


# --- corpora as Megatron-LM's own tools wrote them -------------------------------------------------

LEGACY_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")  # ids V, V+1, V+2, V+3 in the legacy wrapper


def legacy_sentencepiece_ids(sp, text: str) -> list[int]:
    """What Megatron-LM's legacy `SentencePieceTokenizer` wrapper (megatron/training/tokenizer/
    tokenizer.py, _SentencePieceTokenizer) gives for `text`: literal special-token text (its own
    <CLS>/<SEP>/<EOD>/<MASK> at V..V+3, and the model's <pad>/<s>/</s> pieces) becomes that token's
    id, the rest is plain SentencePiece."""
    v = sp.get_piece_size()
    special = {t: v + k for k, t in enumerate(LEGACY_SPECIALS)}
    special.update({sp.id_to_piece(i): i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id())})
    ids, rest = [], text
    while True:
        found = {t: rest.index(t) for t in special if t in rest}
        if not found:
            return ids + sp.encode_as_ids(rest)
        tok = min(found, key=found.get)
        ids += sp.encode_as_ids(rest[:found[tok]]) + [special[tok]]
        rest = rest[found[tok] + len(tok):]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """A corpus as `preprocess_data.py --tokenizer-type SentencePieceTokenizer --append-eod` wrote it
    with the legacy tokenizer: documents of SentencePiece ids + EOD = V + 2, one sequence per
    sentence, the EOD counted in the last sentence; an empty document has no EOD."""
    import sentencepiece

    from examples.tiny_assets import WORDS, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("legacy")
    tok = make_tiny_tokenizer(root / "tok")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok))
    v = sp.get_piece_size()
    rng = np.random.default_rng(5)
    texts = [[" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(int(rng.integers(1, 4)))]
             for _ in range(30)]
    texts[4] = ["a line that quotes </s> and <s> literally"]  # the wrapper maps them to 2 and 1
    texts[7] = []  # empty: no EOD appended

    def write(prefix, texts, eod=v + 2):
        docs = []
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)  # DType.optimal_dtype(v + 4)
        for sentences in texts:
            sentence_ids = [ids for ids in (legacy_sentencepiece_ids(sp, s) for s in sentences) if ids]
            lens = [len(ids) for ids in sentence_ids]
            doc = [i for ids in sentence_ids for i in ids]
            if doc and eod is not None:
                doc.append(eod)
                lens[-1] += 1
            builder.add_document(torch.tensor(doc, dtype=torch.int64), lens)
            docs.append(doc)
        builder.finalize(f"{prefix}.idx")
        return docs

    docs = write(root / "legacy_text_document", texts)
    return {"root": root, "prefix": root / "legacy_text_document", "v": v, "docs": docs, "write": write, "tok": tok}


def legacy_config(prefix, v, *extra, stream_extra=""):
    return load_config(REPO / "configs" / "tiny.yaml", [
        "data.source=streaming", "logging.wandb=disabled", "eval.every=0", "data.shuffle=false", f"model.vocab_size={v}",
        f"data.streams=[{{path: {prefix}, kind: megatron, tokenizer: legacy-sp{stream_extra}}}]", *extra])


def test_legacy_sentencepiece_corpus_is_named_and_read_with_eod_legacy(legacy):
    from streaming import StreamingDataset

    prefix, v, docs = legacy["prefix"], legacy["v"], legacy["docs"]
    assert all(d[-1] == v + 2 for d in docs if d) and 2 in docs[4][:-1] and 1 in docs[4][:-1]
    with pytest.raises(ConfigError) as refused:  # same vocabulary: not "tokenized with another vocabulary"
        build_loader(legacy_config(prefix, v))
    msg = str(refused.value)
    assert "\n" not in msg and "another vocabulary" not in msg
    assert f"every document with id {v + 2} = model.vocab_size + 2" in msg and "set `eod: legacy`" in msg, msg

    cfg = legacy_config(prefix, v, stream_extra=", eod: legacy")
    source = StreamingSource(cfg, document_builder(cfg))
    want = [[BOS, *d[:-1], EOS] for d in docs if d]  # EOD -> our EOS; literal <s>/</s> stay 1/2
    assert megatron_docs(source, len(want)) == want

    # to-mds reads it the same way, with the tokenizer's own size as V
    with pytest.raises(ValueError, match=rf"every document with id {v + 2} = the size of .*set --eod legacy to"):
        convert(["to-mds", str(prefix), "--out", str(legacy["root"] / "refused"), "--tokenizer", str(legacy["tok"])])
    out = legacy["root"] / "mds"
    convert(["to-mds", str(prefix), "--out", str(out), "--tokenizer", str(legacy["tok"]), "--eod", "legacy"])
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    assert [np.asarray(ds[i]["tokens"]).tolist() for i in range(ds.num_samples)] == want

    with pytest.raises(ConfigError, match=r"data.streams\[0\].eod: legacy .*add_eos: true"):
        legacy_config(prefix, v, stream_extra=", eod: legacy, add_eos: true")
    with pytest.raises(ConfigError, match=r"data.streams\[0\].eod: 'nope' is not one of"):
        legacy_config(prefix, v, stream_extra=", eod: nope")


def test_eod_legacy_refuses_what_it_cannot_map(legacy):
    root, v, write = legacy["root"], legacy["v"], legacy["write"]
    write(root / "mask", [["one two"], ["it says <MASK> here"]])  # the wrapper's <MASK> = V + 3
    with pytest.raises(ConfigError, match=rf"'{root / 'mask'}' holds id {v + 3}, the legacy tokenizer's <MASK>"):
        build_loader(legacy_config(root / "mask", v, stream_extra=", eod: legacy"))
    write(root / "no_eod", [["one two"], ["three"]], eod=None)  # made without --append-eod
    with pytest.raises(ConfigError, match=rf"eod: legacy .* EOD {v + 2} .* end with ids other than"):
        build_loader(legacy_config(root / "no_eod", v, stream_extra=", eod: legacy"))
    # a model whose text vocabulary is not the SentencePiece model's: EOD is not V + 2, refused
    with pytest.raises(ConfigError, match=rf"end with id {v + 2}, not EOD {v + 10 + 2}"):
        build_loader(legacy_config(legacy["prefix"], v + 10, stream_extra=", eod: legacy"))


def tokens_model(*extra):
    """tiny.yaml as the discrete-image baseline: text ids 0..1989, image codes 1990..2005."""
    return ["model.image_representation=tokens", "model.vocab_size=2006", "model.image_token_offset=1990",
            "model.image_codebook_size=16", "data.max_caption_tokens=16", *extra]


def test_megatron_ids_in_the_image_code_range_are_refused(tmp_path):
    inside = tmp_path / "inside"
    build_corpus(inside, [[5, 6], [7, 1995]])  # < vocab_size, but an image code
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.source=streaming", "logging.wandb=disabled", "eval.every=0",
                      f"data.streams=[{{path: {inside}, kind: megatron, tokenizer: t}}]", *tokens_model()])
    with pytest.raises(ConfigError, match=rf"Megatron corpus '{inside}' holds token id 1995 but text ids lie below "
                                          r"model.image_token_offset=1990"):
        build_loader(cfg)


def test_text_shard_ids_in_the_image_code_range_are_refused(tmp_path):
    from streaming import MDSWriter

    from data_prep.schema import TEXT_COLUMNS

    shards = tmp_path / "text"
    with MDSWriter(out=str(shards), columns=TEXT_COLUMNS) as w:
        for i, body in enumerate([[5, 6], [7, 1999]]):
            w.write({"key": f"t{i}", "tokens": np.array([BOS, *body, EOS], dtype=np.int32)})
    text_cfg = lambda: load_config(REPO / "configs" / "tiny.yaml", [  # noqa: E731
        "data.source=streaming", "logging.wandb=disabled", "eval.every=0", "data.shuffle=false",
        f"data.streams=[{{path: {shards}, kind: text}}]", *tokens_model()])
    (shards / "dataset_info.json").write_text('{"vocab_size": 2000}')
    with pytest.raises(ConfigError, match=rf"data stream '{shards}' uses a vocabulary of 2000 ids but text ids lie "
                                          r"below model.image_token_offset=1990"):
        build_loader(text_cfg())
    (shards / "dataset_info.json").unlink()  # no vocabulary recorded: the id is caught when read
    source = StreamingSource(text_cfg(), document_builder(text_cfg()))
    next(source)
    with pytest.raises(ConfigError, match=rf"data stream '{shards}' sample t1 holds token id 1999 but text ids lie "
                                          r"below model.image_token_offset=1990"):
        next(source)


def test_refusals_are_one_line_without_megatron_core_import_noise(tmp_path):
    oov = tmp_path / "oov"
    build_corpus(oov, [[5, 6], [7, 2500]])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"), "train.device=cpu",
         "data.source=streaming", "logging.wandb=disabled", "eval.every=0",
         f"data.streams=[{{path: {oov}, kind: megatron, tokenizer: t}}]"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 2 and train.stderr.strip().splitlines() == [
        f"config error: Megatron corpus '{oov}' holds token ids 5..2500 but model.vocab_size=2000: it was tokenized "
        "with another vocabulary (see the stream's tokenizer)"], train.stderr


def test_scan_of_a_wrong_prefix_says_what_a_prefix_is(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wrong = tmp_path / "nowhere" / "text_document"
    scan = subprocess.run([sys.executable, "-m", "data_prep.megatron_convert", "scan", str(wrong)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert scan.returncode == 1 and scan.stderr.strip().splitlines() == [
        f"megatron_convert: error: Megatron corpus '{wrong}': {wrong}.idx and {wrong}.bin not found (a stream's path "
        "is the prefix, without .bin/.idx)"], scan.stderr
