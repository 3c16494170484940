"""scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as image-caption pairs.

A fixed 300 images are held out. Training captions use one of a few templates ("a photo of the
digit three", "a handwritten three", ...); zero-shot classification averages every template of a
class, as CLIP's prompt ensembles do. Sample i of batch `step` depends only on (seed, step, i).
Images are upsampled (bilinear) to (3, S, S) float32, roughly zero mean and unit variance; for a
pretrained Hugging Face model (`pixels`), to its processor's resize side in [0, 1], then
centre-cropped to S (`types.Pixels`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .types import EvalData, Pixels, ZeroShotTask

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}", "a drawing of a {}")
N_HELD_OUT = 300
_SPLIT_SEED = 1797


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


class Digits:
    """Training stream and held-out set over sklearn's digits.

    Args:
        image_size: side of the square model input (the 8x8 digits are upsampled).
        seed: batch `step` is drawn from a generator keyed by (seed, step).
        pixels: a pretrained model's image processor (see the module docstring).
    """

    name = "digits"

    def __init__(self, image_size: int = 16, seed: int = 0, *, pixels: Optional[Pixels] = None):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for digits, got {image_size}")
        self.image_size, self.seed, self.pixels = image_size, seed, pixels
        images, labels = _load()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
        self._test, self._train = order[:N_HELD_OUT], order[N_HELD_OUT:]
        self._images, self._labels = self._prepare(images), labels
        self.vocabulary = sorted({w for t in TEMPLATES for n in NAMES for w in t.format(n).split()})

    def _prepare(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(images)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
        side = self.pixels.resize if self.pixels is not None else self.image_size
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        if self.pixels is not None:
            return self.pixels.from_unit(x)
        return ((x - 0.3) / 0.4).expand(-1, 3, -1, -1).contiguous()

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """Samples [start, stop) of global batch `step` (of `size`): images (stop-start, 3, S, S), captions."""
        rng = np.random.default_rng([self.seed, step])
        idx = self._train[rng.integers(0, len(self._train), size)][start:stop]
        template = rng.integers(0, len(TEMPLATES), size)[start:stop]
        captions = [TEMPLATES[t].format(NAMES[self._labels[i]]) for i, t in zip(idx, template)]
        return self._images[idx], captions

    def eval_set(self) -> EvalData:
        labels = self._labels[self._test]
        prompts = [[t.format(n) for t in TEMPLATES] for n in NAMES]
        task = ZeroShotTask("digit", list(NAMES), prompts, labels)
        captions = [TEMPLATES[0].format(NAMES[y]) for y in labels]
        return EvalData(self._images[self._test], captions, [task], f"{N_HELD_OUT} held-out digits")
