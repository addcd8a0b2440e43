"""data_prep: one bad-input corpus per input format; the job finishes, every good record is written,
every bad one is counted by reason with a 1-based location, damaged containers are named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streaming import LocalDataset

from data_prep import encode_latents, merge_index, readers, tokenize_text
from data_prep.sharding import Stats
from data_prep.text_readers import TextRecord
from data_prep.tokenizer import Tokenizer
from examples import tiny_assets

RES = 16
LONG = "a " * 70_000  # 140,000 characters: over the csv module's 131,072 field limit
C = [tiny_assets.caption(i) for i in range(4)]  # the good captions
GARBAGE = b"this is text, not an image"
# The same four bad captions in every format: over-long, not UTF-8, a lone surrogate (as JSON's escape
# or as its UTF-8-style bytes, which strict UTF-8 rejects).
LATIN1 = b"caf\xe9 au lait"
SURROGATE_BYTES = b"bad \xed\xb3\xa9 caption"
EXPECTED_SKIPS = {"caption_too_long": 1, "bad_utf8": 2, "corrupt_image": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = tiny_assets.make_tiny_tokenizer(root / "tok" / "tiny")
    vae = tiny_assets.make_tiny_vae(root / "vae", resolution=RES)
    return {"tok": str(tok), "vae": str(vae)}


def encode(assets, inputs, out, *extra: str) -> dict:
    argv = ["--input", *map(str, inputs), "--out", str(out), "--vae", assets["vae"], "--tokenizer", assets["tok"],
            "--resolution", str(RES), "--min-size", "8", "--batch-size", "4", "--chunk-size", "5",
            "--decode-workers", "2", *extra]
    return encode_latents.main(argv)


def written(out) -> list[tuple[str, str]]:
    ds = LocalDataset(str(out))
    return [(s["key"], s["caption"]) for s in (ds[i] for i in range(len(ds)))]


def png(i: int) -> bytes:
    return tiny_assets.image_bytes(i, (20, 18))


def write_images(d: Path, names: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (d / name).write_bytes(GARBAGE if name.startswith("corrupt") else png(i))


def check(report: dict, out: Path, skipped: dict, examples: dict, good: list[tuple[str, str]]) -> None:
    """The worker report and the merged report agree; shards hold exactly the good records."""
    merged = json.loads((out / "report.json").read_text())
    for r in (report, merged):
        assert r["complete"] and r["skipped"] == skipped and r["examples"] == examples, r
        assert r["written"] == len(good) and r["records"] == len(good) + sum(skipped.values())
    assert written(out) == good


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def raw_strings(values: list[bytes]) -> pa.Array:
    """A parquet *string* column holding arbitrary bytes, as a careless writer can produce."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                             pa.py_buffer(b"".join(values))])


def test_jsonl_manifest(assets, tmp_path):
    d = tmp_path / "in"
    write_images(d / "img", ["g0.png", "long.png", "latin1.png", "sur.png", "g1.png", "corrupt.jpg", "g2.png"])
    lines = [
        json.dumps({"path": "img/g0.png", "caption": C[0]}).encode(),       # 1
        json.dumps({"path": "img/long.png", "caption": LONG}).encode(),     # 2
        b'{"path": "img/latin1.png", "caption": "' + LATIN1 + b'"}',       # 3: raw non-UTF-8 byte
        b"",                                                                # 4: blank lines count
        b'{"path": "img/sur.png", "caption": "bad \\udce9 caption"}',      # 5: JSON escape of a lone surrogate
        json.dumps({"path": "img/g1.png", "caption": C[1]}).encode(),       # 6
        json.dumps({"path": "img/g0.png", "caption": C[2]}).encode(),       # 7: duplicate key
        json.dumps({"path": "img/corrupt.jpg", "caption": "broken"}).encode(),  # 8
        json.dumps({"path": "img/g2.png", "caption": C[3]}).encode(),       # 9
    ]
    (d / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = encode(assets, [d / "m.jsonl"], tmp_path / "out")
    examples = {"caption_too_long": ["img/long.png (m.jsonl:2)"],
                "bad_utf8": ["m.jsonl:3", "img/sur.png (m.jsonl:5)"],
                "corrupt_image": ["img/corrupt.jpg (m.jsonl:8)"]}
    good = [("img/g0.png", C[0]), ("img/g1.png", C[1]), ("img/g0.png#1", C[2]), ("img/g2.png", C[3])]
    check(report, tmp_path / "out", EXPECTED_SKIPS, examples, good)
    assert report["renamed_duplicate_keys"] == 1
    # Two workers split the manifest between the duplicates: same keys, same counts after the merge.
    for rank in range(2):
        encode(assets, [d / "m.jsonl"], tmp_path / "two", "--rank", str(rank), "--world-size", "2")
    merged = merge_index.main([str(tmp_path / "two")])
    assert written(tmp_path / "two") == good and merged["skipped"] == EXPECTED_SKIPS


def test_csv_manifest(assets, tmp_path):
    d = tmp_path / "in"
    write_images(d / "img", ["g0.png", "long.png", "latin1.png", "sur.png", "g1.png", "corrupt.jpg", "g2.png"])
    rows = [
        b"path,caption",                                   # 1
        f"img/g0.png,{C[0]}".encode(),                     # 2
        f"img/long.png,{LONG}".encode(),                   # 3: used to abort the job with _csv.Error
        b"img/latin1.png," + LATIN1,                       # 4
        b'img/sur.png,"' + SURROGATE_BYTES + b'"',         # 5
        b'img/g1.png,"a red\ncat"',                        # 6-7: one row over two lines
        f"img/g0.png,{C[2]}".encode(),                     # 8: duplicate key
        b"img/corrupt.jpg,broken",                         # 9
        f"img/g2.png,{C[3]}".encode(),                     # 10
    ]
    (d / "m.csv").write_bytes(b"\n".join(rows) + b"\n")
    report = encode(assets, [d / "m.csv"], tmp_path / "out")
    examples = {"caption_too_long": ["img/long.png (m.csv:3)"], "bad_utf8": ["m.csv:4", "m.csv:5"],
                "corrupt_image": ["img/corrupt.jpg (m.csv:9)"]}
    good = [("img/g0.png", C[0]), ("img/g1.png", "a red\ncat"), ("img/g0.png#1", C[2]), ("img/g2.png", C[3])]
    check(report, tmp_path / "out", EXPECTED_SKIPS, examples, good)


def test_folder_with_sidecar_captions(assets, tmp_path):
    d = tmp_path / "folder"
    captions = {"g0": C[0].encode(), "long": LONG.encode(), "latin1": LATIN1, "sur": SURROGATE_BYTES,
                "g1": C[1].encode(), "corrupt": b"broken", "g2": C[3].encode(), "sub/g0": C[2].encode()}
    write_images(d, [f"{stem}.{'jpg' if stem == 'corrupt' else 'png'}" for stem in captions if "/" not in stem])
    write_images(d / "sub", ["g0.png"])
    for stem, text in captions.items():
        (d / f"{stem}.txt").write_bytes(text)
    report = encode(assets, [d], tmp_path / "out", "--format", "folder")
    # A folder cannot hold two files under one path, so keys (relative paths) never repeat:
    # sub/g0.png and g0.png are two samples.
    examples = {"caption_too_long": ["long.png"], "bad_utf8": ["latin1.png", "sur.png"],
                "corrupt_image": ["corrupt.jpg"]}
    good = [("g0.png", C[0]), ("g1.png", C[1]), ("g2.png", C[3]), ("sub/g0.png", C[2])]
    check(report, tmp_path / "out", EXPECTED_SKIPS, examples, good)


def test_webdataset_tars_and_a_truncated_tar(assets, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "shard-0.tar").write_bytes(tar_bytes([
        ("g0.png", png(0)), ("g0.txt", C[0].encode()),
        ("long.png", png(1)), ("long.txt", LONG.encode()),
        ("latin1.png", png(2)), ("latin1.txt", LATIN1),
        ("sur.png", png(3)), ("sur.json", b'{"caption": "bad \\udce9 caption"}'),
        ("badjson.png", png(4)), ("badjson.json", b'{"caption": '),
        ("g1.png", png(5)), ("g1.json", json.dumps({"caption": C[1]}).encode()),
        ("g0.png", png(6)), ("g0.txt", C[2].encode()),  # the key again, later in the tar
        ("corrupt.jpg", GARBAGE), ("corrupt.txt", b"broken"),
        ("g2.png", png(7)), ("g2.txt", C[3].encode()),
    ]))
    full = tar_bytes([m for i in range(6) for m in ((f"h{i}.png", png(10 + i)), (f"h{i}.txt", f"h {i}".encode()))])
    h3 = tarfile.open(fileobj=io.BytesIO(full)).getmember("h3.png")
    (d / "shard-1.tar").write_bytes(full[: h3.offset_data + h3.size // 2])  # an interrupted copy
    inputs = [d / "shard-0.tar", d / "shard-1.tar"]
    report = encode(assets, inputs, tmp_path / "out")
    skipped = {**EXPECTED_SKIPS, "bad_json": 1, "missing_caption": 1, "truncated_tar": 1}
    examples = {"caption_too_long": ["shard-0/long"], "bad_utf8": ["shard-0/latin1", "shard-0/sur"],
                "bad_json": ["shard-0/badjson"], "corrupt_image": ["shard-0/corrupt"],
                "missing_caption": ["shard-1/h3"],  # the sample the cut went through lost its caption
                "truncated_tar": ["shard-1.tar (after shard-1/h3)"]}
    good = [("shard-0/g0", C[0]), ("shard-0/g1", C[1]), ("shard-0/g0#1", C[2]), ("shard-0/g2", C[3]),
            ("shard-1/h0", "h 0"), ("shard-1/h1", "h 1"), ("shard-1/h2", "h 2")]
    check(report, tmp_path / "out", skipped, examples, good)
    again = encode(assets, inputs, tmp_path / "out")  # the damage is deterministic: a rerun resumes all
    assert again["chunks_resumed"] == again["chunks"] and again["skipped"] == skipped


def test_parquet_and_a_truncated_parquet(assets, tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    captions = [C[0].encode(), LONG.encode(), LATIN1, SURROGATE_BYTES, C[1].encode(), C[2].encode(), b"broken",
                C[3].encode()]
    table = pa.table({"key": ["k0", "k1", "k2", "k3", "k4", "k0", "k6", "k7"],  # row 6 repeats k0
                      "image": [GARBAGE if i == 6 else png(i) for i in range(8)],
                      "caption": raw_strings(captions)})
    pq.write_table(table, d / "data.parquet", row_group_size=3)
    pq.write_table(table, d / "whole.parquet")
    data = (d / "whole.parquet").read_bytes()
    (d / "whole.parquet").unlink()
    (d / "cut.parquet").write_bytes(data[: len(data) // 2])  # no footer: used to fail at start-up
    report = encode(assets, [d], tmp_path / "out", "--key-column", "key")
    skipped = {**EXPECTED_SKIPS, "truncated_parquet": 1}
    examples = {"truncated_parquet": ["cut.parquet"], "caption_too_long": ["k1 (data.parquet:2)"],
                "bad_utf8": ["k2 (data.parquet:3)", "k3 (data.parquet:4)"],
                "corrupt_image": ["k6 (data.parquet:7)"]}
    good = [("k0", C[0]), ("k4", C[1]), ("k0#1", C[2]), ("k7", C[3])]
    check(report, tmp_path / "out", skipped, examples, good)


def test_tokenizer_failures_are_counted_not_fatal(assets, tmp_path):
    """Records that slip past the readers' checks still cannot kill a worker: sentencepiece's own
    error on a lone surrogate becomes a `tokenize_error` skip (caption and text paths)."""
    tok = Tokenizer(assets["tok"])

    class Writer:
        def __init__(self):
            self.rows = []

        def write(self, row):
            self.rows.append(row)

    stats, writer = Stats(), Writer()
    chunk = tokenize_text.ChunkTokenizer(tok, batch_docs=8)
    chunk(iter([TextRecord("a:1", "the red sky"), TextRecord("a:3", "bad \udce9"), TextRecord("a:5", "a cat")]),
          writer, stats, lambda n: None)
    assert [r["key"] for r in writer.rows] == ["a:1", "a:5"]
    assert stats.skipped == {"tokenize_error": 1} and stats.examples == {"tokenize_error": ["a:3"]}

    enc = encode_latents.LatentEncoder(assets["vae"], batch_size=4)
    stats, writer = Stats(), Writer()
    chunk = encode_latents.ChunkEncoder(enc, tok, RES, 8, "float16", decode_workers=0)
    records = [readers.ImageRecord("x", "a red cat", lambda: png(0)),
               readers.ImageRecord("y", "bad \udce9", lambda: png(1), where="m.jsonl:2")]
    chunk(iter(records), writer, stats, lambda n: None)
    assert [r["key"] for r in writer.rows] == ["x"]
    assert stats.examples == {"tokenize_error": ["y (m.jsonl:2)"]}


def test_tokenize_text_bad_inputs(assets, tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"text": "the blue sky"}\n{"text": "bad \\udce9 text"}\n\n'
                                b'{"text": "bad \xff bytes"}\n{"text": "a red cat"}\n')
    pq.write_table(pa.table({"text": ["a green tree"] * 4}), d / "whole.parquet")
    data = (d / "whole.parquet").read_bytes()
    (d / "whole.parquet").unlink()
    (d / "b.parquet").write_bytes(data[: len(data) - 10])
    report = tokenize_text.main(["--input", str(d), "--out", str(tmp_path / "out"), "--tokenizer", assets["tok"]])
    assert report["skipped"] == {"bad_utf8": 2, "truncated_parquet": 1}
    assert report["examples"] == {"bad_utf8": ["a.jsonl:2", "a.jsonl:4"], "truncated_parquet": ["b.parquet"]}
    ds = LocalDataset(str(tmp_path / "out"))
    assert [ds[i]["key"] for i in range(len(ds))] == ["a.jsonl:1", "a.jsonl:5"]
