"""Image metrics of inference.evaluate: Fréchet distances and CLIP score, through torchmetrics.

A Fréchet distance compares generated and reference images by the Gaussians their features fit:
FID on Inception-v3 pool features (torch-fidelity's network, weights from a local file), or "FD-<name>"
on any feature net a user saves with torch.export (the embedded demo's digit classifier). The feature
sums are torchmetrics states, so under torchrun each rank adds its own images and `compute` reduces
them. Reference statistics are cached per (image set, feature net, resolution).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
STATE_NAMES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class ScoreError(ValueError):
    """A metric's input the user must fix (a missing weights file, a feature net that cannot load)."""


def _torchmetrics() -> None:
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ScoreError("image metrics need torchmetrics; install the eval extra: pip install -e '.[eval]'") from None


class FeatureNet(torch.nn.Module):
    """A user's feature net saved with torch.export: images [N, 3, H, W] in [0, 1] -> features [N, D],
    or (features [N, D], class ids [N]) when it also classifies (the accuracy metric)."""

    def __init__(self, path: str | Path, resolution: int) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ScoreError(f"--feature-net {path}: no such file (a program saved with torch.export.save)")
        try:
            self.net = torch.export.load(str(path)).module()
            probe = self.net(torch.rand(2, 3, resolution, resolution))
        except Exception as e:  # noqa: BLE001 (whatever the file is, the user gets one line naming it)
            raise ScoreError(f"--feature-net {path} does not load and run as a torch.export program on "
                             f"[N, 3, {resolution}, {resolution}] images ({str(e).splitlines()[0][:160]})") from None
        self.classifies = isinstance(probe, (tuple, list)) and len(probe) == 2
        features = probe[0] if self.classifies else probe
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ScoreError(f"--feature-net {path} must return features [N, D] (or features and class ids)")
        self.num_features = int(features.shape[1])  # torchmetrics reads the width from here
        self.identity = file_identity(path)

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.net(images.float())
        return (out[0], out[1]) if self.classifies else (out, None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        assert self.classifies, "this feature net returns no class ids"
        return self.outputs(images)[1]


def check_inception(path: str | Path) -> Path:
    """The local Inception weights file FID reads, or a one-line error; nothing is ever downloaded."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"--inception {path}: no such file; FID needs torch-fidelity's Inception weights "
                         f"({INCEPTION_FILE}) on local disk, nothing is downloaded at run time")
    return path


class Frechet:
    """Fréchet distance between generated and reference images on one feature net."""

    def __init__(self, name: str, feature_net: FeatureNet | None = None, inception: str | Path | None = None,
                 resolution: int = 0) -> None:
        _torchmetrics()
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.name, self.resolution = name, resolution
        if inception is not None:
            path = check_inception(inception)
            try:
                self.metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                                       feature_extractor_weights_path=str(path))
            except ModuleNotFoundError:
                raise ScoreError("FID needs torch-fidelity's Inception network; install the eval extra: "
                                 "pip install -e '.[eval]'") from None
            except (RuntimeError, KeyError, ValueError) as e:  # not a state dict of that network
                raise ScoreError(f"--inception {path} does not load into torch-fidelity's Inception-v3 "
                                 f"({str(e).splitlines()[0][:160]})") from None
            self.identity = file_identity(path)
        else:
            assert feature_net is not None, "a Frechet score needs a feature net or Inception weights"
            self.metric = FrechetInceptionDistance(feature=feature_net, normalize=True, reset_real_features=False)
            self.identity = feature_net.identity

    @torch.no_grad()
    def add(self, images: torch.Tensor, real: bool) -> None:
        """images [N, 3, H, W] in [0, 1]."""
        if len(images):
            self.metric.update(images.float().clamp(0, 1), real=real)

    def real_count(self) -> int:
        return int(self.metric.real_features_num_samples)

    def compute(self) -> float:
        """The distance over all ranks' images (torchmetrics reduces the sums)."""
        return float(self.metric.compute())

    # ---- reference statistics, cached ------------------------------------------------------

    def cache_file(self, cache_dir: Path, references: Sequence[Any]) -> Path:
        """The cache file of the reference set; `references` identify its images (`file_identity` of a file)."""
        key = {"net": self.identity, "resolution": self.resolution, "images": list(references)}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir / f"{self.name}-{digest}.pt"

    def load_reference(self, file: Path, rank: int) -> bool:
        """Put cached reference sums on rank 0 (the others keep zeros: compute sums over ranks)."""
        if not file.is_file():
            return False
        if rank == 0:
            saved = torch.load(file, weights_only=True)
            for k in STATE_NAMES:
                setattr(self.metric, k, saved[k].to(getattr(self.metric, k).dtype))
        return True

    def save_reference(self, file: Path, rank: int) -> None:
        """Sum this rank's reference states over ranks and write them once (rank 0)."""
        states = {k: getattr(self.metric, k).clone() for k in STATE_NAMES}
        if dist.is_initialized():
            for t in states.values():
                dist.all_reduce(t)
        if rank == 0:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            torch.save(states, tmp)
            tmp.replace(file)


def file_identity(path: Path) -> list[Any]:
    """What a cached statistic depends on for one file: its resolved path, size and mtime."""
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class ClipScore:
    """torchmetrics' CLIP score (100 x cosine of image and caption embeddings) with a local CLIP folder."""

    def __init__(self, folder: str | Path) -> None:
        _torchmetrics()
        from torchmetrics.multimodal.clip_score import CLIPScore

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ScoreError(f"--clip {folder}: not a CLIP folder (no config.json; save one with "
                             f"CLIPModel.save_pretrained and CLIPProcessor.save_pretrained)")
        self.metric = CLIPScore(model_name_or_path=_clip_loader(folder))

    @torch.no_grad()
    def add(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        """images [N, 3, H, W] in [0, 1], one caption each."""
        if len(images):
            self.metric.update(list((images.clamp(0, 1) * 255).round().to(torch.uint8)), list(captions))

    def compute(self) -> float:
        return float(self.metric.compute())


def _clip_loader(folder: Path) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ScoreError(f"--clip {folder} does not load as a CLIP model and processor "
                             f"({str(e).splitlines()[0][:160]})") from None

    return load
