"""Training data: random crops from a folder of images, held in memory as uint8.

The whole corpus (~55 megapixels for the shared training set) fits in memory as uint8, which
makes a crop a cheap slice.  A deterministic subset of files (by sorted name) is held out for
validation so that the validation bits/dim is measured on images never trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .imageio import IMAGE_SUFFIXES, read_image


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


def split_files(files: list[Path], val_every: int = 20) -> tuple[list[Path], list[Path]]:
    """Every ``val_every``-th file (sorted) is held out for validation (at least one)."""
    if len(files) < 2:
        return files, files
    val = files[val_every // 2 :: val_every] or files[:1]
    train = [f for f in files if f not in val]
    return train, val


class CropSampler:
    """Uniformly random crops (with random horizontal flips) from in-memory images.

    Scale augmentation: each crop is cut at a size crop / z, z log-uniform in [``zoom_min``, ``zoom``],
    and resized to ``crop`` (bilinear, antialiased when shrinking, rounded back to 8-bit pixels, so
    the data stay on the pixel grid the codecs' likelihoods assume); a cut larger than the photo is
    clamped to its short side.  Why: the training photos (about 512x384) show a scene with less detail
    per pixel than Kodak downscaled 4x (192x128) and with more than Kodak at 768x512.  ``zoom`` > 1
    (upsampled crops) targets full-size photos, where the rvgc models trained without it did worst
    (``rvgc-small6``, fine-tuned with zoom 2, is better there: its model card); ``zoom_min`` < 1
    (shrunk crops) targets small images.  With both at 1 (the default) the random stream is exactly
    the one of earlier versions, and ``zoom_min`` = 1 keeps the stream of a ``zoom``-only run.
    """

    def __init__(self, files: list[Path], crop: int, seed: int = 0, zoom: float = 1.0, zoom_min: float = 1.0):
        if not 1.0 <= zoom <= 8.0:
            raise ValueError("zoom must be in [1, 8]")
        if not 0.125 <= zoom_min <= 1.0:
            raise ValueError("zoom_min must be in [1/8, 1]")
        self.images = []
        for f in files:
            img = read_image(f, alpha="drop").transpose(2, 0, 1)  # C H W uint8
            if img.shape[0] == 1:
                img = np.repeat(img, 3, axis=0)
            if min(img.shape[1:]) >= crop:
                self.images.append(np.ascontiguousarray(img))
        if not self.images:
            raise ValueError(f"no image is at least {crop}x{crop}")
        self.crop = crop
        self.zoom, self.zoom_min = float(zoom), float(zoom_min)
        areas = np.array([im.shape[1] * im.shape[2] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()  # sample pixels uniformly, not images
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> torch.Tensor:
        """(n, 3, crop, crop) float32 in [-1, 1] at pixel-bin centres."""
        c = self.crop
        out = np.empty((n, 3, c, c), dtype=np.uint8)
        idx = self.rng.choice(len(self.images), size=n, p=self.weights)
        for j, i in enumerate(idx):
            im = self.images[i]
            s = c
            if self.zoom > 1.0 or self.zoom_min < 1.0:
                z = math.exp(self.rng.uniform(math.log(self.zoom_min), math.log(self.zoom)))
                s = min(max(2, round(c / z)), im.shape[1], im.shape[2])
            y = self.rng.integers(0, im.shape[1] - s + 1)
            x = self.rng.integers(0, im.shape[2] - s + 1)
            patch = im[:, y : y + s, x : x + s]
            if s != c:
                patch = _resize(patch, c)
            out[j] = patch[:, :, ::-1] if self.rng.random() < 0.5 else patch
        return torch.from_numpy(out).float().mul_(2.0 / 256.0).add_(1.0 / 256.0 - 1.0)

    def fixed_batch(self, n: int, seed: int = 1234) -> torch.Tensor:
        """A reproducible batch (for validation)."""
        saved = self.rng
        self.rng = np.random.default_rng(seed)
        try:
            return self.batch(n)
        finally:
            self.rng = saved


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    """C h w uint8 -> C size size uint8, bilinear (antialiased when shrinking, as an image downscale is)."""
    t = torch.from_numpy(np.ascontiguousarray(patch)).float()[None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=patch.shape[-1] > size)
    return t[0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def validation_batch(folder: str | Path, crop: int, n: int) -> torch.Tensor:
    """The fixed held-out batch the trainer reports its validation bits/dim on (and model cards)."""
    _, val = split_files(list_images(folder))
    return CropSampler(val, crop, seed=0).fixed_batch(n)
