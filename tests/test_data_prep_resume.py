"""data_prep: SIGKILL + rerun equals an uninterrupted run; a fresh-process StreamingDataset reads back bits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import LocalDataset

from data_prep import encode_latents, images
from data_prep.schema import latents_to_storage
from examples import tiny_assets
from model.image_prep import unscale_latents
from tests.helpers import write_mixed_set

RES = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = tiny_assets.make_tiny_tokenizer(root / "tok" / "tiny")
    vae = tiny_assets.make_tiny_vae(root / "vae", resolution=RES)
    mixed = write_mixed_set(root / "in", n_good=22)
    return {"tok": str(tok), "vae": str(vae), "mixed": mixed, "root": root}


def argv(setup, out) -> list[str]:
    return ["--input", str(setup["mixed"]["manifest"]), "--out", str(out), "--vae", setup["vae"],
            "--tokenizer", setup["tok"], "--resolution", str(RES), "--min-size", "8", "--batch-size", "4",
            "--chunk-size", "4", "--rank", "0", "--world-size", "1"]


def dump(out) -> list[tuple]:
    ds = LocalDataset(str(out))
    return [(s["key"], s["caption"], s["caption_ids"].tobytes(), s["latent_mean"].tobytes(),
             s["latent_std"].tobytes(), s["orig_size"].tolist()) for s in (ds[i] for i in range(len(ds)))]


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(setup, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.encode_latents", *argv(setup, out), "--throttle", "1.0"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / "part-00000"
    deadline = time.time() + 120
    try:  # kill while chunk 1 is being written, after chunk 0 is committed
        while not ((part / "chunk-000000" / "done.json").exists() and (part / ".tmp-chunk-000001").exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "encode_latents did not commit its first chunk in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (part / "chunk-000001").exists() and not (out / "index.json").exists()

    report = encode_latents.main(argv(setup, out))  # the rerun, same CLI
    assert report["chunks_resumed"] >= 1 and report["complete"]
    assert not list(part.glob(".tmp-*"))
    encode_latents.main(argv(setup, tmp_path / "clean"))  # uninterrupted reference
    killed, clean = dump(out), dump(tmp_path / "clean")
    assert len(clean) == len(setup["mixed"]["good"]) and killed == clean
    rep_k = json.loads((out / "report.json").read_text())
    rep_c = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert (rep_k["written"], rep_k["skipped"]) == (rep_c["written"], rep_c["skipped"])


READER = textwrap.dedent("""
    import sys, numpy as np
    from streaming import StreamingDataset
    ds = StreamingDataset(local=sys.argv[1], shuffle=False, batch_size=2)
    rows = list(ds)
    np.savez(sys.argv[2], keys=np.array([r["key"] for r in rows]),
             mean=np.stack([r["latent_mean"] for r in rows]), std=np.stack([r["latent_std"] for r in rows]))
""")


def test_streaming_dataset_in_fresh_process_reads_latents_bit_exactly(setup, tmp_path):
    out = tmp_path / "shards"
    encode_latents.main(argv(setup, out))
    got = tmp_path / "got.npz"
    subprocess.run([sys.executable, "-c", READER, str(out), str(got)], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    data = np.load(got)
    good = setup["mixed"]["good"]
    assert data["keys"].tolist() == good
    # Independent expectation: decode + encode the good images directly with the same VAE.
    enc = encode_latents.LatentEncoder(setup["vae"], batch_size=4)
    root = Path(setup["mixed"]["manifest"]).parent
    pixels = torch.stack([images.load_image((root / k).read_bytes(), RES)[0] for k in good])  # [N, 3, R, R]
    mean, std = zip(*(enc(pixels[i:i + 4]) for i in range(0, len(good), 4)))
    mean, std = torch.cat(mean), torch.cat(std)  # [N, 4, 8, 8]
    assert data["mean"].dtype == np.float16
    assert data["mean"].tobytes() == latents_to_storage(mean).tobytes()
    assert data["std"].tobytes() == latents_to_storage(std).tobytes()
    z = unscale_latents(torch.from_numpy(data["mean"]).float(), enc.scaling_factor, enc.shift_factor)
    with torch.no_grad():
        rec = enc.vae.decode(z).sample  # [N, 3, R, R]
    assert rec.shape == (len(good), 3, RES, RES) and torch.isfinite(rec).all()
