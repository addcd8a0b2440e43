"""examples.digits.edit's ground truth: each edit's target is exactly the edit of its stored source,
the inverses undo their edits, and PSNR is the textbook formula (the fine-tune itself runs in
`make edit-demo`, minutes long, its figures in the README)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from examples import tiny_assets
from examples.digits.edit import EDITS, RESOLUTION, psnr, write_triples


def read(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def test_targets_are_the_edits_of_their_sources_and_inverses_undo_them(tmp_path):
    raw = tmp_path / "raw" / "heldout"
    (raw / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        (raw / "images" / f"d{i}.png").write_bytes(tiny_assets.image_bytes(i, (28, 28), mode="L"))
        rows.append({"key": f"d{i}", "path": f"images/d{i}.png", "label": i})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest, entries = write_triples(tmp_path, tmp_path / "out", "heldout", None)
    assert len(entries) == 3 * len(EDITS) and manifest.is_file()
    assert {e["edit"] for e in entries} == set(EDITS)
    for e in entries:
        source, target = read(e["source"]), read(e["target"])
        assert source.shape == (3, RESOLUTION, RESOLUTION)
        instruction, edit, inverse = EDITS[e["edit"]]
        assert e["instruction"] == instruction
        assert torch.equal(target, edit(source)), e["key"]  # exact: each edit commutes with 8-bit rounding
        if inverse is not None:
            assert torch.equal(inverse(target), source)
        else:
            assert (target >= source).all() and (target > source).any()  # thicker strokes only add ink
    train_manifest, train = write_triples(tmp_path, tmp_path / "out", "heldout", 1)  # one digit per edit
    assert [e["key"].split("/")[0] for e in train] == ["d0", "d1", "d2"]


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
