"""Shards are read by schema: a shard set with a column or encoding outside data_prep/schema.py
(above all `pkl`, which unpickles, i.e. runs, whatever the file holds) is refused with one line
naming the set and the column, by merge_index and by the trainer, before any sample is decoded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streaming import LocalDataset, MDSWriter

from data_prep import merge_index
from data_prep.schema import (DOCUMENT_COLUMNS, TEXT_COLUMNS, SchemaError, check_index, document_parts,
                              document_row, image_columns)
from config import ConfigError, StreamConfig, load_config
from trainer.data import build_loader
from trainer.streaming import open_stream

REPO = Path(__file__).resolve().parents[1]
LATENT = (4, 8, 8)


class CreatesFileWhenUnpickled:
    """Unpickling this runs open(path, 'w'): a stand-in for any code a malicious shard could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def image_sample(i: int, **override) -> dict:
    rng = np.random.default_rng(i)
    return {"key": f"k{i}", "caption": "a red cat", "caption_ids": np.arange(1, 5, dtype=np.int32),
            "latent_mean": rng.standard_normal(LATENT).astype(np.float16),
            "latent_std": np.full(LATENT, 0.1, np.float16), "orig_size": np.array([20, 20], np.int32), **override}


def write_set(folder: Path, columns: dict[str, str], samples: list[dict]) -> Path:
    with MDSWriter(out=str(folder), columns=columns) as w:
        for s in samples:
            w.write(s)
    return folder


def pickled_caption_set(folder: Path, marker: Path) -> Path:
    """Image-caption shards whose `caption` column is `pkl`, holding the marker-creating object."""
    columns = {**image_columns(LATENT), "caption": "pkl"}
    return write_set(folder, columns, [image_sample(i, caption=CreatesFileWhenUnpickled(marker)) for i in range(2)])


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_the_payload_is_live_without_the_check(tmp_path):
    """Control: reading the crafted set with a reader that trusts it does create the marker."""
    marker = tmp_path / "marker"
    shards = pickled_caption_set(tmp_path / "set", marker)
    LocalDataset(str(shards))[0]
    assert marker.exists()


def test_check_index_accepts_our_shards_and_refuses_anything_else(tmp_path):
    img = write_set(tmp_path / "img", image_columns(LATENT), [image_sample(0)])
    bf16 = write_set(tmp_path / "bf16", image_columns(LATENT, "bfloat16"),
                     [image_sample(0, latent_mean=np.zeros(LATENT, np.uint16), latent_std=np.zeros(LATENT, np.uint16))])
    text = write_set(tmp_path / "text", TEXT_COLUMNS, [{"key": "a:1", "tokens": np.array([1, 7, 2], np.int32)}])
    assert (check_index(img), check_index(bf16 / "index.json"), check_index(text, "text")) == ("image", "image", "text")
    with pytest.raises(SchemaError, match=r"holds text shards, but it is configured as a stream of kind 'image'"):
        check_index(text, "image")
    bad = {
        "extra": ({**TEXT_COLUMNS, "extra": "str"}, {"extra": "x"}, r"unexpected column 'extra' \(encoding 'str'\)"),
        "json": ({**TEXT_COLUMNS, "key": "json"}, {"key": {"a": 1}}, r"column 'key' has encoding 'json'"),
        "int64": ({**TEXT_COLUMNS, "tokens": "ndarray:int64"}, {"tokens": np.array([1], np.int64)},
                  r"column 'tokens' has encoding 'ndarray:int64'"),
        "missing": ({"key": "str"}, {}, r"shard 0 has columns \['key'\], which are no kind's set: image \["),
    }
    for name, (columns, override, message) in bad.items():
        sample = {"key": "a:1", "tokens": np.array([1, 7, 2], np.int32)}
        sample = {k: v for k, v in {**sample, **override}.items() if k in columns}
        shards = write_set(tmp_path / name, columns, [sample])
        with pytest.raises(SchemaError, match=rf"^shard set {re.escape(str(shards))}: {message}") as e:
            check_index(shards)
        assert "\n" not in str(e.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{not json")
    with pytest.raises(SchemaError, match=r"cannot read index.json"):
        check_index(tmp_path / "broken")


def test_document_shards_round_trip_parts_roles_and_per_image_shapes(tmp_path):
    """Document rows keep their parts' order, roles, ids and latents (each image its own shape, bf16
    and fp16), a row without images is fine, and a row whose table disagrees is one line."""
    import torch

    rng = torch.Generator().manual_seed(0)
    small, big = torch.randn(4, 8, 8, generator=rng), torch.randn(4, 16, 12, generator=rng)
    parts = [("condition", small, small.abs(), (20, 20)), ("context", [5, 6, 7]), ("generate", big, big.abs(), (40, 30)),
             ("text", [8, 9])]
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        rows = [document_row("edit", parts, dtype), document_row("plain", [("text", [1, 2, 3])], dtype)]
        shards = write_set(tmp_path / dtype, DOCUMENT_COLUMNS, rows)
        assert check_index(shards, "interleaved") == "interleaved"
        ds = LocalDataset(str(shards))
        got = document_parts(ds[0])
        assert [p[0] for p in got] == ["condition", "context", "generate", "text"]
        assert got[1][1].tolist() == [5, 6, 7] and got[3][1].tolist() == [8, 9]
        for (_, mean, std, _), (_, m, s) in ((parts[0], got[0]), (parts[2], got[2])):
            assert m.shape == mean.shape and torch.allclose(m, mean, rtol=tol, atol=tol)
            assert torch.allclose(s, std, rtol=tol, atol=tol)
        assert [(r, v.tolist()) for r, v in document_parts(ds[1])] == [("text", [1, 2, 3])]
    broken = {**rows[0], "text_ids": np.arange(3, dtype=np.int32)}
    with pytest.raises(ValueError, match=r"^document edit: its parts table covers 5 text ids and 1024 latent values "
                                         r"but the row holds 3 and 1024/1024$"):
        document_parts(broken)


def test_merge_index_refuses_a_pickled_column_in_one_line(tmp_path):
    """A part folder holding a chunk with a `pkl` column (e.g. planted in a shared output folder)."""
    marker = tmp_path / "marker"
    out, part = tmp_path / "out", tmp_path / "out" / "part-00000"
    chunk = write_set(part / "chunk-000000", {"key": "str", "obj": "pkl"},
                      [{"key": "a", "obj": CreatesFileWhenUnpickled(marker)}])
    (chunk / "done.json").write_text(json.dumps({"records": 1, "written": 1, "skipped": {}}))
    (part / "job.json").write_text(json.dumps({"kind": "image_caption", "world_size": 1, "rank": 0}))
    (part / "report.json").write_text(json.dumps({"complete": True}))
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "merge_index.py"), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (f"merge_index: error: shard set {chunk}: unexpected column 'obj' (encoding "
                                     f"'pkl'); refusing to read it (allowed columns: data_prep/schema.py)")
    with pytest.raises(SchemaError, match="unexpected column 'obj'"):
        merge_index.main([str(out)])
    assert not marker.exists() and not (out / "index.json").exists()


def streams_override(path: Path, kind: str = "image", remote: Path | None = None) -> str:
    extra = f", remote: {remote}" if remote else ""
    return f"data.streams=[{{path: {path}, kind: {kind}, proportion: 1{extra}}}]"


def test_trainer_refuses_a_pickled_column_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    shards = pickled_caption_set(tmp_path / "set", marker)
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["data.source=streaming", "logging.wandb=disabled", "eval.every=0", streams_override(shards)])
    expected = f"shard set {shards}: column 'caption' has encoding 'pkl', not the one in data_prep/schema.py"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_loader(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny.yaml"),
         "data.source=streaming", streams_override(shards), "logging.wandb=disabled", "eval.every=0",
         f"train.output_dir={tmp_path / 'run'}", "checkpoint.enabled=false", "train.steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert one_line(proc.stderr).startswith(f"config error: {expected}")
    assert not marker.exists()


def test_remote_stream_is_checked_once_its_index_is_cached(tmp_path):
    """A remote stream: the index is fetched into the local cache and checked there, before any sample."""
    marker = tmp_path / "marker"
    remote = pickled_caption_set(tmp_path / "remote", marker)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=rf"^shard set {re.escape(str(cache))}: column 'caption' has encoding 'pkl'"):
        open_stream(StreamConfig(path=str(cache), kind="image", remote=str(remote)))
    assert (cache / "index.json").is_file() and not marker.exists()
    # An unexpected column that streaming itself would accept is refused the same way.
    other = write_set(tmp_path / "remote2", {**image_columns(LATENT), "extra": "str"},
                      [image_sample(0, extra="x")])
    with pytest.raises(ConfigError, match=r"unexpected column 'extra'"):
        open_stream(StreamConfig(path=str(tmp_path / "cache2"), kind="image", remote=str(other)))


def test_megatron_export_refuses_a_pickled_text_column(tmp_path):
    """data_prep.megatron_convert from-mds reads shards too: the same one-line refusal, no marker."""
    pytest.importorskip("megatron.core.datasets.indexed_dataset")
    marker = tmp_path / "marker"
    shards = write_set(tmp_path / "text", {"key": "str", "tokens": "pkl"},
                       [{"key": "a", "tokens": CreatesFileWhenUnpickled(marker)}])
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "megatron_convert.py"), "from-mds", str(shards),
                           "--prefix", str(tmp_path / "out" / "doc")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "column 'tokens' has encoding 'pkl'" in one_line(proc.stderr)
    assert not marker.exists() and not (tmp_path / "out" / "doc.bin").exists()
