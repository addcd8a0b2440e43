"""inference.evaluate: Fréchet distances against their closed form, FID's local Inception file, CLIP
score against CLIP itself, CIDEr / BLEU, perplexity against a dense forward, and a torchrun run on 2
gloo ranks equal to one process.

The model is the tiny random one of tests/conftest.py (`folder`); feature nets are small torch.export
programs the tests write, the Inception and CLIP weights random ones saved through the loading code
the real files go through. No network.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.tiny_assets import caption, image_bytes
from inference.evaluate import main as evaluate_main
from inference.image_scores import ClipScore, FeatureNet, Frechet, ScoreError
from inference.text_scores import caption_scores, caption_tokens, text_nll
from tests.helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

REPO = Path(__file__).resolve().parents[1]


class Flatten(torch.nn.Module):
    """images [N, 3, 1, 1] -> their 3 values: a Fréchet distance over chosen feature vectors."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


class ChannelStats(torch.nn.Module):
    """Per-channel mean and spread as features; the brightest channel as the class."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.flatten(2)  # [N, 3, H*W]
        mean = x.mean(2)
        return torch.cat([mean, (x - mean[..., None]).square().mean(2)], 1), mean.argmax(1)


def export(module: torch.nn.Module, path: Path, side: int) -> Path:
    program = torch.export.export(module, (torch.rand(2, 3, side, side),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(path))
    return path


def closed_form(mu1, s1, mu2, s2) -> float:
    from scipy.linalg import sqrtm

    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))


def test_frechet_distance_is_the_closed_form_of_the_fitted_gaussians(tmp_path):
    net = FeatureNet(export(Flatten(), tmp_path / "flat.pt2", 1), 1)
    g = torch.Generator().manual_seed(0)
    a = 0.5 + 0.03 * torch.randn(4000, 3, generator=g) @ torch.tensor([[1.0, 0.3, 0], [0, 1, 0.2], [0, 0, 0.5]])
    b = 0.45 + 0.05 * torch.randn(3000, 3, generator=g)
    f = Frechet("fd_flat", net, resolution=1)
    f.add(a[:, :, None, None], real=True)
    f.add(b[:, :, None, None], real=False)
    x, y = a.double().numpy(), b.double().numpy()
    want = closed_form(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert f.compute() == pytest.approx(want, rel=1e-4)
    # and, from samples, the distance of the populations they were drawn from
    m = np.array([[1.0, 0.3, 0], [0, 1, 0.2], [0, 0, 0.5]])
    population = closed_form(np.full(3, 0.5), 0.03**2 * m.T @ m, np.full(3, 0.45), 0.05**2 * np.eye(3))
    assert f.compute() == pytest.approx(population, rel=0.05)


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_noise(tmp_path):
    net = FeatureNet(export(ChannelStats(), tmp_path / "stats.pt2", 8), 8)
    images = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.rand(200, 3, 1, 1)
    scores = []
    for noise in (0.0, 0.05, 0.2):
        f = Frechet("fd_stats", net, resolution=8)
        f.add(images, real=True)
        f.add(images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(2)), real=False)
        scores.append(f.compute())
    assert abs(scores[0]) < 1e-6 and 0 < scores[1] < scores[2]


def test_fid_reads_the_inception_weights_from_a_local_file(tmp_path, monkeypatch):
    """torch-fidelity's network with random weights saved to a file, loaded the way real weights are."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    with monkeypatch.context() as m:  # build the network once without any weights, to save random ones
        m.setattr(tf, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = Frechet("fid", inception=tmp_path / "inception.pth")
    f.add(images, real=True)
    f.add(images, real=False)
    assert abs(f.compute()) < 1e-3
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ScoreError, match="does not load into torch-fidelity's Inception"):
        Frechet("fid", inception=tmp_path / "wrong.pth")


def tiny_clip(folder: Path) -> Path:
    """A random CLIP model and a processor (a byte-level BPE vocabulary without merges) saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder.mkdir(parents=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(vocab), **small),
                                 vision_config=dict(image_size=16, patch_size=8, **small), projection_dim=16))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_clips_cosine_from_a_local_folder(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path / "clip")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = [caption(i) for i in range(4)]
    score = ClipScore(folder)
    score.add(images[:3], texts[:3])
    score.add(images[3:], texts[3:])
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    x = proc(text=texts, images=list((images * 255).round().to(torch.uint8)), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=x["pixel_values"]), dim=-1)
        txt = torch.nn.functional.normalize(model.get_text_features(x["input_ids"], x["attention_mask"]), dim=-1)
    want = (100 * (img * txt).sum(-1)).clamp(min=0).mean()
    assert score.compute() == pytest.approx(float(want), abs=1e-3)
    with pytest.raises(ScoreError, match="not a CLIP folder"):
        ClipScore(tmp_path / "nothing")


def test_caption_scores():
    assert caption_tokens("A Dog, running!") == "a dog running"
    refs = {0: ["a red bus on the street", "a bus that is red"], 1: ["two cats on a sofa", "cats sleeping on a couch"]}
    exact = caption_scores({0: "A red bus on the street.", 1: "two cats on a sofa"}, refs)
    wrong = caption_scores({0: "a red bus", 1: "a dog in the snow"}, refs)
    assert exact["bleu4"] == pytest.approx(1.0, abs=1e-6) and exact["cider"] > wrong["cider"] >= 0
    assert 0 <= wrong["bleu4"] < exact["bleu4"]
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({0: "x", 2: "y"}, refs)


def test_text_nll_equals_a_dense_forward_of_each_document(folder):
    from inference.loading import load_inference_model

    model = load_inference_model(folder)[0].eval()
    t = model.cfg.tokens
    docs = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 7, 8, 9, 9, 9]]
    nll, n = text_nll(model, docs, batch_size=2)  # padded batches
    want = 0.0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[t.bos, *d, t.eos]])
            S = ids.shape[1]
            pos = torch.arange(S)[None]
            out = model(ids, pos, torch.zeros(1, S, dtype=torch.int32), (pos + 1).to(torch.int32),
                        torch.zeros(1, S, dtype=torch.bool), torch.zeros(0, model.cfg.latent_channels,
                        model.cfg.latent_size, model.cfg.latent_size), torch.zeros(0, dtype=torch.int64))
            want += float(torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
    assert n == sum(len(d) + 1 for d in docs) and nll == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """5 labelled caption prompts, 3 reference images with references, 3 texts."""
    d = tmp_path_factory.mktemp("manifest")
    rows = [{"caption": caption(i), "label": i % 3} for i in range(5)]
    for i in range(3):
        (d / f"{i}.png").write_bytes(image_bytes(i, (16, 16)))
        rows.append({"image": f"{i}.png", "references": [caption(10 + i), caption(20 + i)]})
    rows += [{"text": caption(30 + i)} for i in range(3)]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    export(ChannelStats(), d / "stats.pt2", 16)
    return d


def args(folder, manifest, out, *extra):
    return [str(folder), "--manifest", str(manifest / "eval.jsonl"), "--feature-net", str(manifest / "stats.pt2"),
            "--steps", "2", "--batch-size", "2", "--max-caption-tokens", "6", "--out", str(out), *extra]


def test_sharded_run_equals_one_process(folder, manifest, tmp_path, capsys):
    assert evaluate_main(args(folder, manifest, tmp_path / "one", "--stats-cache", str(tmp_path / "c1"))) == 0
    printed = capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["suite"] == ["fd", "accuracy", "captions", "ppl"] and "FD-stats" in printed and "CIDEr" in printed
    assert one["counts"] == {"samples": 5, "reference_images": 3, "captions": 3, "text_tokens": one["counts"]["text_tokens"]}
    assert len(list((tmp_path / "c1").glob("fd_stats-*.pt"))) == 1

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "inference.evaluate", *args(folder, manifest, tmp_path / "two", "--stats-cache", str(tmp_path / "c2"))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["counts"] == one["counts"]  # 5 samples over 2 ranks: none lost or doubled
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert (tmp_path / "two" / "captions.jsonl").read_text() == (tmp_path / "one" / "captions.jsonl").read_text()

    # The reference statistics the sharded run cached give the same distance to one process.
    assert evaluate_main(args(folder, manifest, tmp_path / "cached", "--stats-cache", str(tmp_path / "c2"), "--suite", "fd")) == 0
    cached = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert cached["metrics"]["fd_stats"] == pytest.approx(one["metrics"]["fd_stats"], rel=1e-5)


def test_bad_inputs_are_one_line(folder, manifest, tmp_path, capsys):
    def error(*extra, manifest_dir=manifest):
        assert evaluate_main(args(folder, manifest_dir, tmp_path / "e", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    missing = error("--inception", str(tmp_path / "missing.pth"))
    assert "--inception" in missing and "no such file" in missing and "nothing is downloaded" in missing
    assert "--suite clip needs --clip" in error("--suite", "clip")
    assert "unknown metric 'fdi'" in error("--suite", "fdi")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval.jsonl").write_text('{"caption": "x"}\n{"image": "nope.png"}\n')
    export(ChannelStats(), bad / "stats.pt2", 16)
    assert "eval.jsonl:2 names image" in error(manifest_dir=bad)


def test_prompts_references_and_texts_from_heldout_shards(folder, manifest, tmp_path):
    """Image-caption shards give prompts and (VAE-decoded) references, text shards their ids."""
    from streaming import LocalDataset

    from inference.loading import load_inference_model
    from tests.helpers import write_shards

    write_shards(tmp_path / "shards", n_images=4, n_texts=4)
    out = tmp_path / "out"
    assert evaluate_main([str(folder), "--shards", str(tmp_path / "shards" / "images"), "--shards", str(tmp_path / "shards" / "text"),
                          "--limit", "3", "--feature-net", str(manifest / "stats.pt2"), "--steps", "2", "--batch-size", "2",
                          "--max-caption-tokens", "4", "--out", str(out), "--stats-cache", str(tmp_path / "c")]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["suite"] == ["fd", "captions", "ppl"]
    assert r["counts"]["samples"] == r["counts"]["reference_images"] == r["counts"]["captions"] == 3
    texts = LocalDataset(str(tmp_path / "shards" / "text"))
    docs = [[int(t) for t in texts[i]["tokens"][1:-1]] for i in range(3)]
    nll, n = text_nll(load_inference_model(folder)[0].eval(), docs)
    assert r["counts"]["text_tokens"] == n and r["metrics"]["text_nll"] == pytest.approx(nll / n, rel=1e-5)
    refs = [json.loads(x)["references"] for x in (out / "captions.jsonl").read_text().splitlines()]
    assert refs == [["caption 0"], ["caption 1"], ["caption 2"]]
