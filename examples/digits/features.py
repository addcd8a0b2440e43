"""The digit classifier as a feature net for Fréchet distances ("FD-digits") and accuracy.

`DigitFeatures` computes, in torch, exactly what the fitted RBF SVM computes: the pixel features of
`pixel_features`, the kernel against the support vectors, the 45 one-vs-one decision values (the
features: continuous, where sklearn's one-vs-rest scores are vote counts) and the class by libsvm's
vote. Saved with torch.export it is the `--feature-net` of `inference.evaluate`.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import torch


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, H*W]: grayscale, minus the image's median (its background),
    clipped at 0 and scaled to a maximum of 1, so a grey background or a dim stroke does not decide
    the class."""
    x = images.float().mean(1).flatten(1)
    x = (x - torch.quantile(x, 0.5, dim=1, keepdim=True)).clamp(min=0)
    peak = x.amax(dim=1, keepdim=True)
    return x / torch.where(peak > 0, peak, torch.ones_like(peak))


class DigitFeatures(torch.nn.Module):
    """A fitted sklearn SVC (RBF kernel, one-vs-one) as torch: images -> (features [N, P], classes [N])."""

    def __init__(self, svc: Any) -> None:
        super().__init__()
        sv = torch.as_tensor(svc.support_vectors_, dtype=torch.float64)  # [S, D]
        n_classes = len(svc.classes_)
        starts = [0]
        for n in svc.n_support_.tolist():
            starts.append(starts[-1] + n)
        pairs = list(combinations(range(n_classes), 2))
        coef = torch.zeros(len(sv), len(pairs), dtype=torch.float64)  # [S, P]: libsvm's layout of dual_coef_
        dual = torch.as_tensor(svc.dual_coef_, dtype=torch.float64)  # [n_classes - 1, S]
        for p, (i, j) in enumerate(pairs):
            coef[starts[i]:starts[i + 1], p] = dual[j - 1, starts[i]:starts[i + 1]]
            coef[starts[j]:starts[j + 1], p] = dual[i, starts[j]:starts[j + 1]]
        self.register_buffer("support", sv)
        self.register_buffer("coef", coef)
        self.register_buffer("intercept", torch.as_tensor(svc.intercept_, dtype=torch.float64))
        self.register_buffer("first", torch.tensor([i for i, _ in pairs]))
        self.register_buffer("second", torch.tensor([j for _, j in pairs]))
        self.register_buffer("labels", torch.as_tensor(svc.classes_, dtype=torch.int64))
        self.gamma = float(svc._gamma)
        self.n_classes = n_classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixel_features(images).double()  # [N, D]
        sq = (x * x).sum(1, keepdim=True) - 2 * x @ self.support.T + (self.support * self.support).sum(1)  # [N, S]
        dec = torch.exp(-self.gamma * sq.clamp(min=0)) @ self.coef + self.intercept  # [N, P] one-vs-one decisions
        winner = torch.where(dec > 0, self.first, self.second)  # libsvm: a positive value votes for the first class
        votes = torch.nn.functional.one_hot(winner, self.n_classes).sum(1)  # [N, n_classes]
        return dec.float(), self.labels[votes.argmax(1)]  # ties: the lowest class, as libsvm


def save_feature_net(svc: Any, path: Path, resolution: int) -> Path:
    """The fitted classifier as a torch.export program (any batch size) for `inference.evaluate --feature-net`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, resolution, resolution)
    program = torch.export.export(DigitFeatures(svc).eval(), (example,), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(path))
    return path
