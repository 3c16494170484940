"""Fashion-MNIST (60,000 + 10,000 real 28x28 photos of clothes, 10 classes) as image-caption pairs
(`--data fashion-mnist`), read offline from Debian's dataset-fashion-mnist (IDX files).

Training captions use one of a few templates ("a photo of a pullover", ...) over the 60,000
training images; sample i of batch `step` depends only on (seed, step, i). Evaluation: the first
`N_EVAL` of the 10,000 test images (never trained on), zero-shot classification whose class
embedding averages every template of the class (CLIP's prompt ensembles), and retrieval against
the 10 first-template captions. Images are upsampled (bilinear) to (3, S, S) float32; for a
pretrained Hugging Face model (`pixels`), to its processor's resize side in [0, 1], then
centre-cropped to S (`types.Pixels`).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .types import DataError, EvalData, Pixels, ZeroShotTask

FOLDER = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "sudo apt-get install dataset-fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = ("a photo of a {}", "a black and white photo of a {}", "a picture of the {}", "a low resolution photo of a {}")
N_EVAL = 2000


class FashionUnavailable(DataError):
    """The IDX files are not installed; the message names the command that installs them."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of its declared shape. DataError (a ValueError;
    a usage error on the command line) naming the file if it is malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape).copy()  # writable, for torch


def load(split: str, folder: Path = FOLDER) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) int64) of split "train" or "t10k"."""
    paths = [folder / f"{split}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FashionUnavailable(f"--data fashion-mnist needs {', '.join(missing)}: {INSTALL}")
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


class FashionMNIST:
    """Training stream and held-out set over Fashion-MNIST (see the module docstring)."""

    name = "fashion-mnist"

    def __init__(self, image_size: int = 32, seed: int = 0, folder: Path = FOLDER, *,
                 pixels: Optional[Pixels] = None):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for fashion-mnist, got {image_size}")
        self.image_size, self.seed, self.pixels = image_size, seed, pixels
        self._train, self._labels = load("train", folder)
        test, test_labels = load("t10k", folder)
        self._test, self._test_labels = self._prepare(test[:N_EVAL]), test_labels[:N_EVAL]
        self.vocabulary = sorted({w for t in TEMPLATES for c in CLASSES for w in t.format(c).split()})

    def _prepare(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None] / 255.0
        side = self.pixels.resize if self.pixels is not None else self.image_size
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        if self.pixels is not None:
            return self.pixels.from_unit(x)
        return ((x - 0.29) / 0.35).expand(-1, 3, -1, -1).contiguous()

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, len(self._train), size)[start:stop]
        template = rng.integers(0, len(TEMPLATES), size)[start:stop]
        captions = [TEMPLATES[t].format(CLASSES[self._labels[i]]) for i, t in zip(idx, template)]
        return self._prepare(self._train[idx]), captions

    def eval_set(self) -> EvalData:
        prompts = [[t.format(c) for t in TEMPLATES] for c in CLASSES]
        task = ZeroShotTask("fashion", list(CLASSES), prompts, self._test_labels)
        captions = [TEMPLATES[0].format(CLASSES[y]) for y in self._test_labels]
        return EvalData(self._test, captions, [task], f"{N_EVAL} held-out Fashion-MNIST test images")
