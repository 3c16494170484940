"""Data sources for `megabatch train`: what a training stream and an evaluation set look like.

A training stream serves slices of global batches: `batch(step, size, start, stop)` returns samples
[start, stop) of global batch `step` (of `size` samples) as (images (n, 3, S, S) float32, captions list[str]); rank r of
W reads [r*b, (r+1)*b) with b = B / W. Streams whose samples are a function of (seed, step, index)
(synthetic, digits) resume from the step alone; file streams also carry a `state_dict()`.

`--data` specs: "synthetic" (default), "digits", "emoji", "fashion-mnist", "csv:PATH" (also .tsv), "wds:PATTERN". The
evaluation set is the data's own held-out split (synthetic: unseen combinations; digits: 300
images; users' files: `--eval-split` of them, which training never sees) unless `--eval-data`
names another spec (files: all their pairs, or the first `--eval-size`).

Users' files with fewer distinct pairs than the global batch B are trained on as asked, with a
warning: every batch then holds some pairs twice or more (2 training rows at B = 64: each 32
times), which the loss cannot tell from data (under --positives index the copies are each other's
negatives). Distinct pairs are distinct (image, caption) rows: captions or ids that repeat by
design (class labels) are no reason to warn.

Each source normalises its images with its own mean and std for the built-in towers. Given a
`Pixels` (a pretrained Hugging Face model's image processor, `--model hf:`), every source instead
yields [0, 1] RGB on the 1/255 grid of a decoded image, at the processor's output size and
geometry, and the model applies the processor's mean and std (`hf_model.HFDualEncoder`): users'
files go through the processor's own resize and centre crop; the rendered sets draw their images at
the side the processor resizes a square image to, then take its centre crop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
from torch import Tensor


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
    """Held-out images (n, 3, S, S) with one caption each, and zero-shot tasks over the same images."""

    images: Tensor
    captions: list[str]
    tasks: list[ZeroShotTask]
    description: str = ""
    ids: Optional[np.ndarray] = None  # (n,) int64 per-pair ids (users' files with an id column/member)


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
    name: str
    vocabulary: Optional[list[str]]

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]: ...

    def eval_set(self) -> Optional[EvalData]: ...


def build_data(spec: str, image_size: int, seed: int, rank: int = 0, world: int = 1, *, cfg: Any = None,
               device: Any = "cpu", pixels: Optional[Pixels] = None) -> TrainStream:
    """Resolve a `--data` spec to a stream (file streams read only this rank's shard, with the
    columns, held-out split and workers of `cfg`, a TrainConfig, and put batches on `device`).
    With `pixels`, the stream yields a pretrained model's [0, 1] images (see the module docstring)
    and keeps `pixels` as its attribute, for the evaluation set."""
    if spec == "synthetic":
        from .synthetic import SyntheticShapes

        return SyntheticShapes(image_size=image_size, seed=seed, pixels=pixels)
    if spec == "digits":
        from .digits import Digits

        return Digits(image_size=image_size, seed=seed, pixels=pixels)
    if spec == "emoji":
        from .emoji import Emoji

        return Emoji(image_size=image_size, seed=seed, pixels=pixels)
    if spec == "fashion-mnist":
        from .fashion import FashionMNIST

        return FashionMNIST(image_size=image_size, seed=seed, pixels=pixels)
    kind, _, path = spec.partition(":")
    if kind in ("csv", "wds") and path:
        from .filestream import FileOptions, FileStream

        opts = FileOptions.from_config(cfg) if cfg is not None else FileOptions()
        opts.pixels = pixels
        held_out = cfg is None or cfg.eval_data is None
        stream = FileStream(kind, path, image_size, seed, rank, world, opts, device, held_out)
        if cfg is not None and rank == 0:
            _warn_if_few_pairs(stream, cfg.batch_size)
        return stream
    raise ValueError(f"--data must be synthetic, digits, emoji, fashion-mnist, csv:PATH or wds:PATTERN, got {spec!r}")


def _warn_if_few_pairs(stream: Any, batch_size: int) -> None:
    distinct = stream.distinct_pairs(batch_size)
    if distinct < batch_size:
        warnings.warn(f"{stream.name}: the training data holds {distinct} distinct pairs, fewer than the global batch "
                      f"{batch_size}: each batch repeats pairs; give more data or a smaller --batch-size", stacklevel=3)


def build_eval(spec: Optional[str], stream: TrainStream, image_size: int, seed: int, limit: int, *,
               cfg: Any = None) -> Optional[EvalData]:
    """The evaluation set: `spec`'s (--eval-data) if given, else the training data's own held-out set.
    `limit`: at most this many pairs of users' files (0: all). Its images are made as the training
    stream's are (`stream.pixels`: a pretrained model's processor, or None)."""
    if spec is None:
        return stream.eval_set()
    pixels = getattr(stream, "pixels", None)
    kind, _, path = spec.partition(":")
    if kind in ("csv", "wds") and path:
        from .filestream import FileOptions, file_eval_set

        opts = FileOptions.from_config(cfg) if cfg is not None else FileOptions()
        opts.eval_size, opts.pixels = limit, pixels
        return file_eval_set(kind, path, image_size, opts)
    return build_data(spec, image_size, seed, pixels=pixels).eval_set()


def state_of(stream: Any) -> dict[str, Any]:
    """A stream's resumable position beyond the step (empty for index-addressed streams)."""
    fn = getattr(stream, "state_dict", None)
    return fn() if callable(fn) else {}
