"""data_prep.encode_documents: editing triples (JSONL, CSV, Parquet) and interleaved documents (JSONL,
Parquet) from a bad-input corpus of our own: every good document is written with its parts in
order and its roles, every bad one counted by reason, none silently changed; the shards train."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from streaming import LocalDataset

from data_prep import encode_documents, images
from data_prep.encode_latents import LatentEncoder
from data_prep.schema import check_index, document_parts, latents_to_storage, storage_to_tensor
from data_prep.tokenizer import Tokenizer
from examples import tiny_assets
from tests.helpers import tiny_run_config

RES = 16
GARBAGE = b"this is text, not an image"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    d = root / "img"
    d.mkdir()
    for i in range(4):
        (d / f"good{i}.png").write_bytes(tiny_assets.image_bytes(i, (20, 18)))
    (d / "corrupt.png").write_bytes(GARBAGE)
    (d / "tiny.png").write_bytes(tiny_assets.image_bytes(9, (4, 4)))
    return {"tok": str(tiny_assets.make_tiny_tokenizer(root / "tok" / "tiny")),
            "vae": str(tiny_assets.make_tiny_vae(root / "vae", resolution=RES)), "img": d}


def run_worker(assets, fmt, inputs, out, *extra: str) -> dict:
    """One worker's report."""
    return encode_documents.main(["--format", fmt, "--input", *map(str, inputs), "--out", str(out), "--vae",
                                  assets["vae"], "--tokenizer", assets["tok"], "--resolution", str(RES), "--min-size",
                                  "8", "--batch-size", "4", "--chunk-size", "3", "--decode-workers", "2", *extra])


def encode(assets, fmt, inputs, out, *extra: str) -> dict:
    """One worker's run, merged: the merged report."""
    run_worker(assets, fmt, inputs, out, *extra)
    return json.loads((out / "report.json").read_text())


def documents(out) -> dict[str, list]:
    ds = LocalDataset(str(out))
    return {s["key"]: document_parts(s) for s in (ds[i] for i in range(len(ds)))}


def jsonl(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def expected_latent(assets, name: str) -> torch.Tensor:
    """The stored (fp16) mean that encode_latents' preprocessing and VAE give the image on its own."""
    pixels, _ = images.load_image((assets["img"] / name).read_bytes(), RES, 8)
    mean, _ = LatentEncoder(assets["vae"], 4, "cpu")(pixels[None])
    return storage_to_tensor(latents_to_storage(mean[0], "float16")).float()


def test_edit_triples_in_every_format_skip_any_bad_part_whole(assets, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = assets["img"]
    jsonl(src / "edits.jsonl", [
        {"source": str(img / "good0.png"), "instruction": "make it red", "target": str(img / "good1.png")},
        {"source": str(img / "corrupt.png"), "instruction": "make it red", "target": str(img / "good1.png")},
        {"source": str(img / "good0.png"), "instruction": "make it red", "target": None},
        {"source": str(img / "good0.png"), "instruction": "   ", "target": str(img / "good1.png")},
        {"source": str(img / "good0.png"), "target": str(img / "good1.png")},
        "{not json",
        {"source": "missing.png", "instruction": "make it blue", "target": str(img / "good2.png")},
    ])
    (src / "edits.csv").write_text(
        "source,instruction,target\n"
        f"{img / 'good2.png'},turn it around,{img / 'good3.png'}\n"
        f"{img / 'good2.png'},turn it around,{img / 'tiny.png'}\n")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = (img / "good3.png").read_bytes()
    pq.write_table(pa.table({
        "source": pa.array([good, None], pa.binary()),
        "instruction": ["a photo of the cat", "a photo of the dog"],
        "target": pa.array([{"bytes": (img / "good0.png").read_bytes(), "path": None}, {"bytes": good, "path": None}],
                           struct)}), src / "edits.parquet")
    report = encode(assets, "edit", [src], tmp_path / "out")
    assert report["skipped"] == {"bad_json": 1, "instruction_empty": 1, "instruction_missing": 1,
                                 "source_corrupt_image": 1, "source_missing_image": 1, "source_unreadable": 1,
                                 "target_missing_image": 1, "target_too_small": 1}
    assert report["written"] == 3 and report["records"] == 11 and "dropped_parts" not in report
    assert check_index(tmp_path / "out") == "interleaved"
    docs = documents(tmp_path / "out")
    assert sorted(docs) == ["edits.csv:2", "edits.jsonl:1", "edits.parquet:1"]
    tok = Tokenizer(assets["tok"])
    for key, instruction, source, target in (("edits.jsonl:1", "make it red", "good0.png", "good1.png"),
                                             ("edits.csv:2", "turn it around", "good2.png", "good3.png")):
        roles = [p[0] for p in docs[key]]
        assert roles == ["condition", "context", "generate"]
        assert docs[key][1][1].tolist() == tok.encode(instruction)
        assert torch.equal(docs[key][0][1], expected_latent(assets, source))  # the image's own latent, bit for bit
        assert torch.equal(docs[key][2][1], expected_latent(assets, target))


def interleaved_rows(img) -> list:
    g = [str(img / f"good{i}.png") for i in range(4)]
    return [
        {"texts": ["A cat.", None, "It sleeps.", None], "images": [None, g[0], None, g[1]]},  # 1 good
        {"texts": ["Two dogs.", None, "And one more.", None], "images": [None, g[2], None, str(img / "corrupt.png")]},
        {"texts": [None], "images": [g[0]]},  # 3 no text
        {"texts": [], "images": []},  # 4 empty
        {"texts": ["a", None], "images": [None]},  # 5 malformed: lengths differ
        {"texts": ["a", "b"], "images": [None, g[0]]},  # 6 malformed: both set at one position
        {"texts": ["x", None, None, None], "images": [None, g[0], g[1], g[2]]},  # 7 too many images
        {"texts": ["  ", "The end.", None], "images": [None, None, g[3]]},  # 8 an empty text part dropped
    ]


@pytest.mark.parametrize("rule", ["drop_image", "drop_document"])
def test_interleaved_documents_follow_the_bad_image_rule_and_count_everything(assets, tmp_path, rule):
    src = tmp_path / "src"
    src.mkdir()
    jsonl(src / "web.jsonl", interleaved_rows(assets["img"]))
    pq.write_table(pa.table({"texts": [["Bytes inside.", None]],
                             "images": [[None, (assets["img"] / "good1.png").read_bytes()]]}), src / "web.parquet")
    report = encode(assets, "interleaved", [src], tmp_path / "out", "--max-images", "2", "--bad-image", rule)
    skipped = {"empty_document": 1, "malformed_document": 2, "no_text": 1, "too_many_images": 1}
    if rule == "drop_document":
        skipped["corrupt_image"] = 1
    assert report["skipped"] == skipped and report["records"] == 9
    want_dropped = {"empty_text": 1, **({"corrupt_image": 1} if rule == "drop_image" else {})}
    assert report["dropped_parts"] == want_dropped
    assert report["examples"]["dropped empty_text"] == ["web.jsonl:8 text 1"]
    docs = documents(tmp_path / "out")
    roles = {k: [p[0] for p in v] for k, v in docs.items()}
    assert roles["web.jsonl:1"] == ["text", "generate", "text", "generate"]
    assert roles["web.jsonl:8"] == ["text", "generate"] and roles["web.parquet:1"] == ["text", "generate"]
    if rule == "drop_image":
        assert roles["web.jsonl:2"] == ["text", "generate", "text"]  # the corrupt image gone, its text kept
    else:
        assert "web.jsonl:2" not in roles
    assert torch.equal(docs["web.parquet:1"][1][1], expected_latent(assets, "good1.png"))


def test_edit_and_interleaved_shards_train(assets, tmp_path):
    """Both shard sets as interleaved streams, mixed with each other: a few tiny steps run, the
    condition images reach the batches as max_t 0 and the context as positions without targets."""
    img = assets["img"]
    src = tmp_path / "src"
    src.mkdir()
    jsonl(src / "edits.jsonl", [{"source": str(img / f"good{i}.png"), "instruction": "make it red",
                                 "target": str(img / f"good{(i + 1) % 4}.png")} for i in range(4)])
    jsonl(src / "web.jsonl", [interleaved_rows(img)[0]] * 3)
    encode(assets, "edit", [src / "edits.jsonl"], tmp_path / "edit")
    encode(assets, "interleaved", [src / "web.jsonl"], tmp_path / "web")
    jsonl(src / "heldout.jsonl", [{"source": str(img / "good3.png"), "instruction": "make it blue",
                                   "target": str(img / "good2.png")}] * 2)
    encode(assets, "edit", [src / "heldout.jsonl"], tmp_path / "heldout")
    from trainer.data import build_loader
    from trainer.evaluation import Evaluator
    from trainer.train import make_engine, process_env

    cfg = tiny_run_config(tmp_path / "run", 96, "data.source=streaming", "train.batch_size=2",
                          f"data.streams=[{{path: {tmp_path / 'edit'}, kind: interleaved, proportion: 1, "
                          f"recipe: {{drop_both: 0.1, split_long: false}}}}, "
                          f"{{path: {tmp_path / 'web'}, kind: interleaved, proportion: 1}}]",
                          "eval.every=1", f"eval.streams=[{{path: {tmp_path / 'heldout'}, kind: interleaved, "
                          "recipe: {drop_both: 1.0}}]")
    engine, loader = make_engine(cfg), build_loader(cfg)
    conditions = 0
    for step in range(3):
        batch = next(loader)
        conditions += int((batch.image_max_t == 0).sum())
        result = engine.train_step([batch], step)
        assert np.isfinite(result.loss) and result.diffusion_loss > 0 and result.lm_loss > 0
    assert conditions > 0
    evaluator = Evaluator(cfg, process_env(cfg))  # held out: no guidance dropout, the sources not scored
    assert evaluator.images == 4
    timesteps = torch.cat([hb.timesteps for step in evaluator.steps for hb in step])
    assert (timesteps == -1).sum() == 2 and (timesteps >= 0).sum() == 2
    metrics = evaluator.run(engine)
    assert np.isfinite(metrics["eval/diffusion_loss"]) and np.isfinite(metrics["eval/caption_lm_loss"])


def test_two_workers_and_a_rerun_write_what_one_worker_does(assets, tmp_path):
    """Partitioned (one unit per file) and resumable: 2 workers + merge_index equal 1 worker bit for
    bit; a rerun of a finished worker resumes every chunk and writes nothing new."""
    from data_prep import merge_index

    src = tmp_path / "src"
    src.mkdir()
    rows = interleaved_rows(assets["img"])
    jsonl(src / "a.jsonl", rows[:4])
    jsonl(src / "b.jsonl", rows[4:] + rows[:1])
    one = encode(assets, "interleaved", [src], tmp_path / "one")
    for rank in (0, 1):
        run_worker(assets, "interleaved", [src], tmp_path / "two", "--rank", str(rank), "--world-size", "2")
    merge_index.main([str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert {k: two[k] for k in ("written", "skipped", "dropped_parts")} == {k: one[k] for k in ("written", "skipped", "dropped_parts")}
    a, b = documents(tmp_path / "one"), documents(tmp_path / "two")
    assert list(a) == list(b)
    for key in a:
        assert [p[0] for p in a[key]] == [p[0] for p in b[key]]
        assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for p, q in zip(a[key], b[key])
                   for x, y in zip(p[1:], q[1:]))
    again = run_worker(assets, "interleaved", [src], tmp_path / "one")
    assert again["chunks_resumed"] == again["chunks"] and again["written"] == one["written"]
