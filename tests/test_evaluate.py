"""examples.digits.evaluate end to end on a random tiny model, a random tiny VAE and fake held-out digits.

Nothing is trained: the model is freshly initialized and saved in the trainer's checkpoint layout,
so the accuracies are meaningless; the test checks the plumbing (conversion, classifier on real
digits only, both generation directions, PNGs, results.json, errors) in seconds.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import examples.digits.evaluate as ev
from examples.digits.prepare import TEMPLATES
from model.transfusion import TransfusionModel
from tests.helpers import one_thread, save_checkpoint, tiny_run_config  # noqa: F401 (one_thread: autouse fixture)

PER_CLASS = 3  # fake held-out digits per class


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An embedded-default-shaped data folder: raw/{train,heldout}, tokenizer, a random 16x16 VAE.
    The training captions use every template but the last, so the last one counts as held out."""
    import sentencepiece as spm
    from examples.tiny_assets import make_tiny_vae

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    heldout = root / "raw" / "heldout"
    (heldout / "images").mkdir(parents=True)
    prototypes = rng.random((10, 28, 28)) > 0.7
    with open(heldout / "manifest.jsonl", "w") as f:
        for d in range(10):
            for k in range(PER_CLASS):
                pixels = np.where(prototypes[d] ^ (rng.random((28, 28)) > 0.9), 255, 0).astype(np.uint8)
                name = f"images/d{d}_{k}.png"
                Image.fromarray(pixels, "L").save(heldout / name)
                f.write(json.dumps({"key": f"d{d}_{k}", "path": name, "caption": ev.caption(TEMPLATES[0], d), "label": d}) + "\n")
    train = root / "raw" / "train"
    train.mkdir(parents=True)
    captions = [ev.caption(t, d) for t in TEMPLATES[:-1] for d in range(10)]
    (train / "manifest.jsonl").write_text("".join(json.dumps({"path": "x.png", "caption": c, "label": 0}) + "\n" for c in captions))

    (root / "tokenizer").mkdir()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(ev.caption(t, d) for t in TEMPLATES for d in range(10)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer" / "tokenizer"), vocab_size=80, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=5, control_symbols=["<boi>", "<eoi>"], minloglevel=2,
        hard_vocab_limit=False,
    )
    make_tiny_vae(root / "vae")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A randomly initialized tiny model (context 64) saved like the trainer saves it, plus metrics.jsonl."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_run_config(out, 64, "data.source=synthetic")
    torch.manual_seed(0)
    save_checkpoint(out, 5, cfg, {"model": TransfusionModel(cfg.model).state_dict()})
    rows = [{"step": s, "loss": 9 - s, "lm_loss": 7 - s, "diffusion_loss": 0.4 - 0.05 * s, "grad_norm": 1.0,
             "lr": 1e-3, "tokens_per_s": 1000.0} for s in (1, 3, 5)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_evaluate_end_to_end_on_a_random_model(run, data, tmp_path, monkeypatch, capsys):
    fitted = []
    real_fit = ev.DigitClassifier.fit
    monkeypatch.setattr(ev.DigitClassifier, "fit", lambda self, x, y: fitted.append(x.copy()) or real_fit(self, x, y))
    out = tmp_path / "eval"
    code = ev.main(["--run", str(run), "--data", str(data), "--out", str(out), "--images-per-class", "1",
                    "--steps", "2", "--batch-size", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    n_real = 10 * PER_CLASS

    assert r["step"] == 5 and (out / "model" / "config.json").is_file() and (out / "model" / "vae").is_dir()
    c = r["classifier"]
    assert c["train_size"] == n_real and c["cv_folds"] == PER_CLASS
    assert 0 <= c["cv_accuracy"] <= 1 and 0 <= c["cv_accuracy_on_vae_reconstructions"] <= 1
    # Every fit (the CV folds and the final one) saw only rows of the real held-out digits.
    files = sorted((data / "raw" / "heldout" / "images").glob("*.png"))
    real = ev.features(ev.load_pixels(files, 16))
    assert len(fitted) == PER_CLASS + 1 and len(fitted[-1]) == n_real
    for x in fitted:
        assert np.abs(x[:, None, :] - real[None]).max(-1).min(-1).max() == 0

    c2i, i2c = r["caption_to_image"], r["image_to_caption"]
    assert c2i["n"] == 10 and len(c2i["predictions"]) == 10 and set(c2i["per_class"]) == {str(d) for d in range(10)}
    assert c2i["template"] == TEMPLATES[-1] and c2i["template_held_out"] is True
    assert c2i["prompts"][7] == ev.caption(TEMPLATES[-1], 7)
    assert i2c["n"] == n_real and 0 <= i2c["accuracy"] <= 1 and 0 <= i2c["unparsed"] <= n_real
    assert all({"label", "caption", "parsed"} <= set(e) for e in i2c["examples"])
    assert set(r["passed"]) == set(r["targets"]) == {"caption_to_image", "image_to_caption"}
    assert r["final_metrics"]["step"] == 5 and r["settings"]["steps"] == 2

    for name in ("grid", "loss_curve"):
        path = r["files"][name]
        assert path in printed
        with Image.open(path) as img:
            img.load()
            assert img.width > 50 and img.height > 50
    fd, cap = r["fd_digits"], r["captions"]
    assert fd["generated"] > 0 and fd["vae_reconstructions"] >= 0 and fd["real_digits"] == n_real
    assert 0 <= cap["bleu4"] <= 1 and cap["cider"] >= 0 and "FD-digits" in printed and "CIDEr" in printed

    # The general command on the files the demo wrote scores the same samples and captions the same way.
    from inference.evaluate import main as evaluate_main

    again = tmp_path / "again"
    assert evaluate_main([r["files"]["model"], "--manifest", r["files"]["manifest"], "--feature-net", r["files"]["feature_net"],
                          "--steps", "2", "--cfg-scale", "3", "--batch-size", "8", "--max-caption-tokens", "16",
                          "--out", str(again), "--stats-cache", str(tmp_path / "stats")]) == 0
    printed = capsys.readouterr().out
    assert "FD-digits" in printed and "CIDEr" in printed and "classifier accuracy" in printed
    m = json.loads((again / "results.json").read_text())["metrics"]
    assert m["fd_digits"] == pytest.approx(fd["generated"], rel=1e-5)
    assert m["accuracy"] == pytest.approx(c2i["accuracy"]) and m["cider"] == pytest.approx(cap["cider"])


def test_digit_feature_net_is_the_svm(tmp_path):
    """The exported feature net computes the SVM's one-vs-one decision values and predictions."""
    from examples.digits.features import save_feature_net
    from inference.image_scores import FeatureNet

    rng = np.random.default_rng(0)
    images = torch.rand(60, 3, 8, 8)
    labels = np.concatenate([np.arange(10), rng.integers(0, 10, 50)])
    x = ev.features(images)
    clf = ev.DigitClassifier().fit(x, labels)
    net = FeatureNet(save_feature_net(clf.model, tmp_path / "digits.pt2", 8), 8)
    clf.model.decision_function_shape = "ovo"
    assert net.classifies and net.num_features == 45
    np.testing.assert_allclose(net(images).numpy(), clf.model.decision_function(x), atol=1e-5)
    assert (net.classify(images).numpy() == clf.predict(x)).all()


def test_caption_subset_is_balanced_over_classes(run, data, tmp_path):
    r = ev.evaluate(run, data, tmp_path / "eval", ev.EvalSettings(images_per_class=1, steps=1, caption_images=10))
    assert r["image_to_caption"]["n"] == 10 and set(r["image_to_caption"]["per_class"]) == {str(d) for d in range(10)}


def test_errors_say_what_to_run(run, data, tmp_path, capsys):
    assert ev.main(["--run", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ev.main(["--run", str(run), "--data", str(tmp_path / "nodata")]) == 2
    assert "python -m examples.digits.prepare" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert ev.main(["--run", str(tmp_path / "empty_run"), "--data", str(data), "--out", str(tmp_path / "e")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_parse_digit():
    assert ev.parse_digit("a handwritten digit seven") == 7
    assert ev.parse_digit("the number 7") == 7
    assert ev.parse_digit("The number 7 written by hand") == 7
    assert ev.parse_digit("a white handwritten zero on a black background") == 0
    assert ev.parse_digit("a small picture of a hand drawn 3.") == 3
    assert ev.parse_digit("seven, i.e. 7") == 7
    for garbage in ("", None, "thou art a villain", "the number 17", "a digit two or three", "threes"):
        assert ev.parse_digit(garbage) is None
