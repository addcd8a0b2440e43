"""Scoring and plots for examples.digits.evaluate: the digit classifier, the caption parser, the PNGs.

Kept apart from the evaluation's orchestration so each file stays readable; nothing here touches
the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORD = re.compile(r"[a-z]+|\d+")


def parse_digit(text: str | None) -> int | None:
    """The digit a caption names ("seven" or "7"); None when it names none, or two different ones."""
    found = set()
    for w in WORD.findall((text or "").lower()):
        if w in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(w))
        elif len(w) == 1 and w.isdigit():
            found.add(int(w))
    return found.pop() if len(found) == 1 else None


# ---- pixels --------------------------------------------------------------------------------------


def load_pixels(files: Sequence[Path], size: int) -> torch.Tensor:
    """Image files -> [N, 3, size, size] in [0, 1], preprocessed exactly like the VAE's input and
    inference.evaluate's reference images (inference.images.preprocess_image_file)."""
    from inference.images import preprocess_image_file

    return torch.stack([(preprocess_image_file(f, size) + 1) / 2 for f in files])


def features(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> classifier features [N, H*W] (features.pixel_features, as numpy)."""
    from .features import pixel_features

    return pixel_features(images).numpy()


# ---- classifier ----------------------------------------------------------------------------------


class DigitClassifier:
    """RBF-kernel SVM on `features` of the pixels: ~93% on 500 real MNIST digits in well under a second."""

    def __init__(self, C: float = 5.0) -> None:
        from sklearn.svm import SVC

        self.model = SVC(C=C, gamma="scale")
        self.train_size = 0

    def fit(self, x: np.ndarray, y: np.ndarray) -> "DigitClassifier":
        self.model.fit(x, y)
        self.train_size = len(x)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


def train_classifier(real: np.ndarray, labels: np.ndarray, recon: np.ndarray | None, folds: int,
                     seed: int = 0) -> tuple[DigitClassifier, dict[str, Any]]:
    """Fit on the real held-out digits; report k-fold accuracy on held-out folds of the real digits
    and of their VAE reconstructions (each fold's model is fitted on real digits only)."""
    from sklearn.model_selection import StratifiedKFold

    k = min(folds, int(np.bincount(labels).min()))
    report: dict[str, Any] = {"kind": "RBF SVM (C=5) on normalized grayscale pixels", "train_source": "real held-out digits",
                              "train_size": len(real), "cv_folds": k}
    if k >= 2:
        real_acc, recon_acc = [], []
        for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(real, labels):
            clf = DigitClassifier().fit(real[tr], labels[tr])
            real_acc.append(float((clf.predict(real[te]) == labels[te]).mean()))
            if recon is not None:
                recon_acc.append(float((clf.predict(recon[te]) == labels[te]).mean()))
        report |= {"cv_accuracy": float(np.mean(real_acc)), "cv_accuracy_std": float(np.std(real_acc))}
        if recon_acc:
            report["cv_accuracy_on_vae_reconstructions"] = float(np.mean(recon_acc))
    else:
        report |= {"cv_accuracy": None, "note": "too few digits per class for cross-validation"}
    return DigitClassifier().fit(real, labels), report


def per_class(pred: Sequence[int | None], labels: Sequence[int]) -> dict[str, Any]:
    """Overall and per-class accuracy (None predictions count as wrong)."""
    pred_a, lab = np.array([-1 if p is None else p for p in pred]), np.asarray(labels)
    classes = {str(c): float((pred_a[lab == c] == c).mean()) for c in range(10) if (lab == c).any()}
    return {"accuracy": float((pred_a == lab).mean()), "n": len(lab), "per_class": classes}


# ---- plots ---------------------------------------------------------------------------------------


def save_class_grid(images: torch.Tensor, labels: list[int], pred: np.ndarray, n: int, path: Path) -> Path:
    """Generated images, one row per class; a misclassified image carries its predicted digit in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    pad, side = 2, images.shape[-1]
    grid = make_grid(images, nrow=n, padding=pad, pad_value=1.0).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.6 * 10 + 0.6))
    ax.imshow(grid, interpolation="nearest")
    cell = side + pad
    for k, (y, p) in enumerate(zip(labels, pred)):
        if p != y:
            ax.text(pad + (k % n) * cell + 1, pad + (k // n) * cell + 1, str(p), color="red", fontsize=7, va="top")
    ax.set_yticks([pad + c * cell + side / 2 for c in range(10)], [str(c) for c in range(10)])
    ax.set_xticks([])
    ax.set_ylabel("prompted digit")
    acc = float((np.asarray(pred) == np.asarray(labels)).mean())
    ax.set_title(f"caption -> image, classifier accuracy {acc:.0%}\n(red: predicted digit when wrong)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl rows merged per step (training and eval/ lines) and sorted by step; a resumed
    run's repeated steps keep their last values."""
    rows: dict[int, dict[str, float]] = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            rows.setdefault(int(r["step"]), {}).update(r)
    return [rows[k] for k in sorted(rows)]


def save_loss_curve(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Total and LM loss (left) and the diffusion ε-MSE (right) against the step, training and held out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, keys in ((left, (("loss", "total (LM + λ·diffusion)"), ("lm_loss", "LM"),
                             ("eval/text_lm_loss", "held-out text LM"), ("eval/caption_lm_loss", "held-out caption LM"))),
                     (right, (("diffusion_loss", "diffusion (ε-MSE)"),
                              ("eval/diffusion_loss", "held-out diffusion (fixed t, 8 buckets)")))):
        for key, label in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                style = "--" if key.startswith("eval/") else "-"
                ax.plot(*zip(*points), style, marker=".", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_ylabel("loss")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
