"""The types the app's data layer shares: what a training stream, an evaluation set and a pretrained
model's pixels look like, and the error for data that cannot be used as asked.

They live below both the registry of `--data` specs (`data.py`) and the sources it builds (synthetic,
digits, emoji, fashion, filestream), so that each source can name them without importing the
registry that imports it. See `data.py` for what the sources serve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
from torch import Tensor


class DataError(ValueError):
    """Data that cannot be used as asked: the message names the file, what it holds and the flag."""


class MissingDataFile(DataError, FileNotFoundError):
    """A table or shard pattern that names nothing on disk."""


@dataclass
class ZeroShotTask:
    """Zero-shot classification: class c's text embedding is the mean over prompts[c].

    labels: (n,) int64, the true class of each evaluation image.
    attributes: optional {name: (num_classes,) int64}, a property of each class (e.g. its shape);
        the evaluation also reports how often the predicted class has the true class's property.
    rows: optional (n,) int64 indices of the evaluation images the task is about (default: all of
        them, in order); `labels` then holds one class per listed row.
    """

    name: str
    classes: list[str]
    prompts: list[list[str]]
    labels: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    rows: Optional[np.ndarray] = None


@dataclass
class EvalData:
    """Held-out images (n, 3, S, S) (or a text query's token ids) with one caption each, and zero-shot
    tasks over the same images."""

    images: Tensor
    captions: list[str]
    tasks: list[ZeroShotTask]
    description: str = ""
    ids: Optional[np.ndarray] = None  # (n,) int64 per-pair ids (users' files with an id column/member)
    # Text-text data (--data wordnet): `images` holds the queries' token ids, `queries` their text, `sides` what
    # the two sides are ("definition", "name"), `reference` the pretrained model's scores (evaluate.zero_shot_model)
    queries: Optional[list[str]] = None
    sides: tuple[str, str] = ("image", "text")
    reference: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Pixels:
    """What a pretrained model's image processor makes of an image, split in two: the data yields
    [0, 1] RGB (n, 3, size, size) on the 1/255 grid; the model computes (x * scale - mean) / std.

    size: the processor's output side (the vision tower's image_size).
    resize: the side the processor resizes a square image to before its centre crop to `size`.
    geometry: PIL RGB image -> (3, size, size) uint8, the processor's own resize and crop.
    scale: 255 * the processor's rescale factor (1.0 for the usual 1/255).
    """

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    geometry: Callable[[Any], Tensor]
    scale: float = 1.0

    def from_unit(self, images: Tensor) -> Tensor:
        """Rendered [0, 1] images (n, C, resize, resize) -> (n, 3, size, size): rounded to 1/255 as an
        8-bit image is, then the centre crop (the processor's: top-left at (resize - size) // 2)."""
        if images.shape[-1] != self.resize or images.shape[-2] != self.resize:
            raise ValueError(f"rendered images are {tuple(images.shape[-2:])}, not {self.resize} a side")
        x = images.clamp(0.0, 1.0).mul(255.0).round_().div_(255.0)
        top = (self.resize - self.size) // 2
        return x[..., top:top + self.size, top:top + self.size].expand(-1, 3, -1, -1).contiguous()


class TrainStream(Protocol):
    """What `data.build_data` returns (see data.py for the slices `batch` serves)."""

    name: str
    vocabulary: Optional[list[str]]

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]: ...

    def eval_set(self) -> Optional[EvalData]: ...
