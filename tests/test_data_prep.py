"""data_prep: tokenizer ids, preprocessing, bad inputs, partitioning + merge, input formats, text shards."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
from streaming import LocalDataset

from config import ModelConfig, SpecialTokens
from data_prep import encode_latents, images, merge_index, tokenize_text, train_vae
from data_prep.schema import sample_latents
from data_prep.sharding import resolve_worker
from data_prep.tokenizer import Tokenizer, load_special_tokens
from data_prep.train_tokenizer import extend_existing
from examples import tiny_assets
from tests.helpers import GOOD_KINDS, write_mixed_set

RES = 16  # tiny VAE: 16x16 -> 4x8x8
REPO = Path(__file__).resolve().parents[1]
# Every data_prep module with a main is a tool a data engineer may run as `python data_prep/<tool>.py`.
TOOLS = sorted(p.stem for p in (REPO / "data_prep").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
assert {"train_tokenizer", "train_vae", "encode_latents", "tokenize_text", "merge_index"} <= set(TOOLS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = tiny_assets.make_tiny_tokenizer(root / "tok" / "tiny")
    vae = tiny_assets.make_tiny_vae(root / "vae", resolution=RES)
    return {"tok": str(tok), "vae": str(vae), "root": root}


def encode(assets, inputs, out, *extra: str) -> dict:
    argv = ["--input", *map(str, inputs), "--out", str(out), "--vae", assets["vae"], "--tokenizer", assets["tok"],
            "--resolution", str(RES), "--min-size", "8", "--batch-size", "4", "--chunk-size", "5",
            "--decode-workers", "2", *extra]
    return encode_latents.main(argv)


def read_all(out) -> list[dict]:
    ds = LocalDataset(str(out))
    return [ds[i] for i in range(len(ds))]


def test_tokenizer_special_ids(assets):
    tok = Tokenizer(assets["tok"])
    assert tok.special_tokens() == {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4}
    assert tok.sp.unk_id() not in range(5)
    info = load_special_tokens(assets["tok"])
    assert info["vocab_size"] == tok.vocab_size and info["boi"] == 3
    ids = tok.encode("a red cat")
    assert ids and ids[0] != tok.bos_id and ids[-1] != tok.eos_id  # no BOS/EOS unless asked
    assert tok.encode("a red cat", bos=True, eos=True) == [1, *ids, 2]
    assert 3 not in tok.encode("<boi> x <eoi>")  # control symbols are never produced by text
    assert tok.decode(tok.encode("the  blue\nsky", bos=True, eos=True)) == "the  blue\nsky"  # lossless
    # Checked against a model config (as inference loads it): a differing id is named.
    Tokenizer(assets["tok"], ModelConfig(vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match=r"boi: tokenizer 3 vs config 7"):
        Tokenizer(assets["tok"], ModelConfig(vocab_size=tok.vocab_size, tokens=SpecialTokens(boi=7)))


def test_extend_existing_tokenizer(assets, tmp_path):
    corpus = Path(assets["tok"]).with_name("tiny.corpus.txt")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "base"), vocab_size=200,
                                   model_type="bpe", minloglevel=2)  # unk 0, bos 1, eos 2, no pad
    base = spm.SentencePieceProcessor(model_file=str(tmp_path / "base.model"))
    info = extend_existing(tmp_path / "base.model", tmp_path / "ext")
    assert (info["bos"], info["eos"]) == (1, 2)
    assert sorted([info["boi"], info["eoi"], info["pad"]]) == [200, 201, 202]
    tok = Tokenizer(tmp_path / "ext.model")
    assert tok.vocab_size == 203 and tok.encode("the red house") == base.encode("the red house")
    with pytest.raises(ValueError, match="lacks special tokens"):
        Tokenizer(tmp_path / "base.model")


@pytest.mark.parametrize("kind", GOOD_KINDS, ids=[k[0] for k in GOOD_KINDS])
def test_preprocess_every_mode(kind):
    _, mode, fmt, (w, h) = kind
    x, orig = images.load_image(tiny_assets.image_bytes(0, (w, h), mode, fmt), RES)
    assert x.shape == (3, RES, RES) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and orig == (h, w)


def test_transparent_pixels_become_white():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(buf, "PNG")
    x, _ = images.load_image(buf.getvalue(), RES)
    assert torch.all(x == 1.0)


def test_mixed_inputs_report_and_every_good_sample_once(assets, tmp_path):
    mixed = write_mixed_set(tmp_path / "in")
    report = encode(assets, [mixed["manifest"]], tmp_path / "out")
    assert report["skipped"] == mixed["bad"]
    assert report["written"] == len(mixed["good"])
    merged = json.loads((tmp_path / "out" / "report.json").read_text())
    assert merged["skipped"] == mixed["bad"] and merged["complete"]
    samples = read_all(tmp_path / "out")
    assert [s["key"] for s in samples] == mixed["good"]  # each good sample once, in input order
    tok = Tokenizer(assets["tok"])
    for s in samples:
        assert s["latent_mean"].dtype == np.float16 and s["latent_mean"].shape == (4, 8, 8)
        assert np.all(s["latent_std"] > 0)
        assert s["caption_ids"].tolist() == tok.encode(s["caption"])
    gray16 = next(s for s in samples if "gray16" in s["key"])
    assert gray16["orig_size"].tolist() == [18, 18]
    rgb_jpg = next(s for s in samples if "rgb_jpg" in s["key"])
    assert rgb_jpg["orig_size"].tolist() == [30, 40]
    mean, std = sample_latents(samples[0])
    assert mean.dtype == torch.float32 and mean.shape == (4, 8, 8)
    # A rerun resumes every chunk and changes nothing.
    again = encode(assets, [mixed["manifest"]], tmp_path / "out")
    assert again["chunks_resumed"] == again["chunks"] and again["written"] == report["written"]
    with pytest.raises(ValueError, match="other settings"):
        encode(assets, [mixed["manifest"]], tmp_path / "out", "--min-size", "2")


def test_partitioned_workers_merge_equals_one_worker(assets, tmp_path):
    mixed = write_mixed_set(tmp_path / "in")
    encode(assets, [mixed["manifest"]], tmp_path / "one")
    for rank in range(3):
        encode(assets, [mixed["manifest"]], tmp_path / "three", "--rank", str(rank), "--world-size", "3")
        if rank == 1:  # merging before every part exists is refused (or partial on request)
            with pytest.raises(RuntimeError, match="missing parts"):
                merge_index.main([str(tmp_path / "three")])
            partial = merge_index.main([str(tmp_path / "three"), "--allow-partial"])
            assert not partial["complete"]
    report = merge_index.main([str(tmp_path / "three")])
    one, three = read_all(tmp_path / "one"), read_all(tmp_path / "three")
    assert [s["key"] for s in three] == [s["key"] for s in one]
    for a, b in zip(one, three):
        assert a["latent_mean"].tobytes() == b["latent_mean"].tobytes()
        assert a["latent_std"].tobytes() == b["latent_std"].tobytes()
    assert report["skipped"] == mixed["bad"] and report["parts"] == 3


def _good_set(n: int = 6) -> list[tuple[bytes, str]]:
    return [(tiny_assets.image_bytes(i, (20 + i, 18), "RGB", "PNG"), tiny_assets.caption(i)) for i in range(n)]


def test_all_input_formats_give_the_same_latents(assets, tmp_path):
    items = _good_set()
    d = tmp_path / "in"
    (d / "imgs").mkdir(parents=True)
    for i, (data, _) in enumerate(items):
        (d / "imgs" / f"{i:03d}.png").write_bytes(data)
    (d / "m.jsonl").write_text("".join(json.dumps({"path": f"imgs/{i:03d}.png", "caption": c}) + "\n"
                                       for i, (_, c) in enumerate(items)))
    with open(d / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([f"imgs/{i:03d}.png", c] for i, (_, c) in enumerate(items))
    for shard, part in ((0, items[:4]), (1, items[4:])):
        with tarfile.open(d / f"shard-{shard}.tar", "w") as tf:
            for j, (data, cap) in enumerate(part):
                key = f"s{shard}_{j:03d}"
                meta = cap.encode() if j % 2 else json.dumps({"caption": cap}).encode()
                for name, payload in ((f"{key}.png", data), (f"{key}.{'txt' if j % 2 else 'json'}", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    table = pa.table({"img": [x for x, _ in items], "text": [c for _, c in items]})
    pq.write_table(table, d / "data.parquet", row_group_size=4)
    runs = {
        "jsonl": [d / "m.jsonl"], "csv": [d / "m.csv"], "tar": [d / "shard-0.tar", d / "shard-1.tar"],
        "parquet": [d / "data.parquet"],
    }
    results = {}
    for name, inputs in runs.items():
        extra = ["--image-column", "img", "--caption-column", "text"] if name == "parquet" else []
        rep = encode(assets, inputs, tmp_path / name, *extra)
        assert rep["written"] == len(items) and rep["skipped_total"] == 0, (name, rep)
        results[name] = read_all(tmp_path / name)
    ref = results["jsonl"]
    for name, samples in results.items():
        assert [s["caption"] for s in samples] == [c for _, c in items], name
        assert all(a["latent_mean"].tobytes() == b["latent_mean"].tobytes() for a, b in zip(ref, samples)), name
    # Parquet keys are 1-based row numbers (like every location in the reports): row 6 is data.parquet:6.
    assert results["tar"][0]["key"] == "shard-0/s0_000" and results["parquet"][5]["key"] == "data.parquet:6"
    # More workers than tar files: an empty part is fine and the merge equals the single run.
    for rank in range(3):
        rep = encode(assets, runs["tar"], tmp_path / "tar3", "--rank", str(rank), "--world-size", "3")
        assert rep["written"] == [0, 4, 2][rank]
    merge_index.main([str(tmp_path / "tar3")])
    assert [s["key"] for s in read_all(tmp_path / "tar3")] == [s["key"] for s in results["tar"]]


def test_bfloat16_storage(assets, tmp_path):
    items = _good_set(3)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, (data, cap) in enumerate(items):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
        lines.append(json.dumps({"path": f"imgs/{i}.png", "caption": cap}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    encode(assets, [tmp_path / "m.jsonl"], tmp_path / "f16")
    encode(assets, [tmp_path / "m.jsonl"], tmp_path / "bf16", "--latent-dtype", "bfloat16")
    for a, b in zip(read_all(tmp_path / "f16"), read_all(tmp_path / "bf16")):
        assert b["latent_mean"].dtype == np.uint16
        mean_bf, _ = sample_latents(b, dtype=None)
        assert mean_bf.dtype == torch.bfloat16
        torch.testing.assert_close(mean_bf.float(), sample_latents(a)[0], atol=2e-2, rtol=1e-2)


def test_resolve_worker_from_environment(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_worker() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_worker() == (1, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_worker() == (2, 3)
    assert resolve_worker(0, 2) == (0, 2)
    with pytest.raises(ValueError):
        resolve_worker(3, 3)


def test_tokenize_text_formats_and_bad_lines(assets, tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_bytes(b"first doc line one\nline two\n\nsecond \xff\xfe bad doc\n\n\nthird doc\n")
    (d / "b.jsonl").write_bytes(b'{"text": "the blue sky"}\n{"text": "bad \xc3\x28"}\n{"text": ""}\n'
                                b'{"other": 1}\nnot json\n{"text": "a red cat"}\n')
    pq.write_table(pa.table({"text": pa.array([b"a green tree", None, b"\xff"], pa.binary())}), d / "c.parquet")
    report = tokenize_text.main(["--input", str(d), "--out", str(tmp_path / "out"), "--tokenizer", assets["tok"],
                                 "--chunk-size", "3"])
    assert report["skipped"] == {"bad_utf8": 3, "bad_json": 1, "empty_text": 1, "missing_text": 2}
    tok = Tokenizer(assets["tok"])
    samples = read_all(tmp_path / "out")
    # Keys are 1-based locations: a paragraph's first line, a JSONL line, a parquet row.
    assert [s["key"] for s in samples] == ["a.txt:1", "a.txt:7", "b.jsonl:1", "b.jsonl:6", "c.parquet:1"]
    assert samples[0]["tokens"].tolist() == [1, *tok.encode("first doc line one\nline two"), 2]
    assert samples[0]["tokens"].dtype == np.int32
    per_file = tokenize_text.main(["--input", str(d / "a.txt"), "--out", str(tmp_path / "files"),
                                   "--tokenizer", assets["tok"], "--doc-split", "file"])
    assert per_file["skipped"] == {"bad_utf8": 1}


def test_train_vae_from_yaml(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(tiny_assets.image_bytes(i, (20, 20)))
    (tmp_path / "vae.yaml").write_text("resolution: 16\nblock_out_channels: [8, 16]\nlatent_channels: 4\n"
                                       "steps: 2\nbatch_size: 4\nlog_every: 1\n")
    summary = train_vae.main(["--config", str(tmp_path / "vae.yaml"), "--input", str(tmp_path / "imgs"),
                              "--out", str(tmp_path / "vae")])
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] == pytest.approx(summary["scaling_factor"]) and cfg["scaling_factor"] != 0.18215
    assert summary["latent_shape"] == [4, 8, 8]
    enc = encode_latents.LatentEncoder(str(tmp_path / "vae"), batch_size=2)
    assert enc.latent_shape(16) == (4, 8, 8)
    with pytest.raises(SystemExit):
        (tmp_path / "bad.yaml").write_text("stepz: 3\n")
        train_vae.main(["--config", str(tmp_path / "bad.yaml"), "--input", "x", "--out", "y"])


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_as_a_script(tool, tmp_path):
    """`python data_prep/<tool>.py` works as data engineers run it: from the repo root and elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cwd, script in ((REPO, f"data_prep/{tool}.py"), (tmp_path, str(REPO / "data_prep" / f"{tool}.py"))):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: {tool}.py"), proc.stdout[:200]
