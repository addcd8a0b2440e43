"""One image preprocessing for training data and inference prompts: same pixels, same latents.

data_prep (encode_latents, train_vae) and inference (prompt images) both call
`model.image_prep.load_image`; these tests feed the same files through both real entry points.
"""

import io
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data_prep import images
from data_prep.encode_latents import LatentEncoder
from examples import tiny_assets
from inference.images import ImageFileError, encode_image_file, load_vae, preprocess_image_file
from config import ModelConfig
from tests.conftest import REPO
from tests.helpers import GOOD_KINDS

RES = 32  # the tiny VAE downsamples 2x: latents 4 x 16 x 16
CFG = ModelConfig(latent_channels=4, latent_size=RES // 2)


def exif_rotated_jpeg() -> bytes:
    """A 60 x 36 JPEG whose EXIF says 'rotate 90 degrees' (displayed 36 x 60)."""
    img = Image.open(io.BytesIO(tiny_assets.image_bytes(7, (60, 36))))
    exif = img.getexif()
    exif[images.ORIENTATION_TAG] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Image files covering every decode path: modes, formats, alpha, EXIF rotation, up- and
    downscaling, and a JPEG large enough for the reduced-scale (draft) decode."""
    root = tmp_path_factory.mktemp("images")
    blobs = {f"{name}.{fmt.lower()}": tiny_assets.image_bytes(i, size, mode, fmt)
             for i, (name, mode, fmt, size) in enumerate(GOOD_KINDS)}
    blobs["wide_downscaled.png"] = tiny_assets.image_bytes(20, (97, 61))
    blobs["large_draft.jpeg"] = tiny_assets.image_bytes(21, (320, 200), "RGB", "JPEG")
    blobs["rotated.jpeg"] = exif_rotated_jpeg()
    paths = []
    for name, data in blobs.items():
        (root / name).write_bytes(data)
        paths.append(root / name)
    return paths


def test_training_and_inference_preprocessing_are_identical(image_files):
    for path in image_files:
        train = images.load_image(path.read_bytes(), RES)[0]  # what encode_latents encodes
        infer = preprocess_image_file(path, RES)  # what a prompt image becomes
        assert infer.shape == (3, RES, RES) and infer.dtype == torch.float32
        assert torch.equal(train, infer), path.name


def test_bicubic_not_bilinear(image_files):
    """The shared resize is PIL bicubic (what the shards were made with), not torchvision bilinear."""
    from torchvision.transforms import v2 as T

    path = next(p for p in image_files if p.name == "wide_downscaled.png")
    with Image.open(path) as img:
        bilinear = T.Compose([T.ToImage(), T.Resize(RES, antialias=True), T.CenterCrop(RES),
                              T.ToDtype(torch.float32, scale=True)])(img.convert("RGB")) * 2 - 1
    assert (preprocess_image_file(path, RES) - bilinear).abs().max() > 0.02


@pytest.mark.parametrize("batch_size", [1, 4])
def test_same_latents_through_the_same_vae(image_files, tmp_path, batch_size):
    """encode_latents' encoder and inference's encode_image_file give the same scaled posterior
    means: bit for bit at the same batch shape (1); encode_latents pads its batches to batch_size
    (4 is its CPU default), and the VAE's convolutions then sum in another order (~1e-7 apart,
    far below the float16 the shards store; the bilinear preprocessing was up to 0.18 apart)."""
    vae_dir = tiny_assets.make_tiny_vae(tmp_path / "vae", resolution=RES, scaling_factor=0.7)
    encoder = LatentEncoder(str(vae_dir), batch_size=batch_size, device="cpu")
    vae = load_vae(vae_dir, CFG)
    for path in image_files:
        mean, _ = encoder(images.load_image(path.read_bytes(), RES)[0][None])
        latent = encode_image_file(vae, path, CFG)
        assert latent.shape == (4, RES // 2, RES // 2)
        if batch_size == 1:
            assert torch.equal(mean[0], latent), path.name
        else:
            torch.testing.assert_close(mean[0], latent, rtol=0, atol=1e-5, msg=path.name)


def test_unreadable_prompt_image_is_one_line(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageFileError) as e:
        preprocess_image_file(bad, RES)
    assert str(e.value).startswith(f"cannot use image '{bad}': corrupt_image") and "\n" not in str(e.value)


def test_inference_does_not_import_data_prep():
    code = ("import sys, inference.images, inference.prompts, inference.generate, inference.convert\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'data_prep'))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
