"""Data sources for `megabatch train`: what a training stream and an evaluation set look like.

A training stream serves slices of global batches: `batch(step, size, start, stop)` returns samples
[start, stop) of global batch `step` (of `size` samples) as (images (n, 3, S, S) float32, captions list[str]); rank r of
W reads [r*b, (r+1)*b) with b = B / W. Streams whose samples are a function of (seed, step, index)
(synthetic, digits) resume from the step alone; file streams also carry a `state_dict()`.

`--data` specs: "synthetic" (default), "digits", "emoji", "fashion-mnist", "wordnet" (text-text pairs: its
stream yields a definition's token ids where the others yield images; wordnet_data.py), "csv:PATH" (also
.tsv), "wds:PATTERN". The
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
from typing import Any, Optional

from .types import EvalData, Pixels, TrainStream


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
    if spec == "wordnet":
        from .wordnet_pairs import WordNetPairs

        return WordNetPairs(seed, getattr(cfg, "wordnet_synsets", 0), getattr(cfg, "eval_size", 0))
    kind, _, path = spec.partition(":")
    if kind in ("csv", "wds") and path:
        from .files.stream import FileOptions, FileStream

        opts = FileOptions.from_config(cfg) if cfg is not None else FileOptions()
        opts.pixels = pixels
        held_out = cfg is None or cfg.eval_data is None
        stream = FileStream(kind, path, image_size, seed, rank, world, opts, device, held_out)
        if cfg is not None and rank == 0:
            _warn_if_few_pairs(stream, cfg.batch_size)
        return stream
    raise ValueError(f"--data must be synthetic, digits, emoji, fashion-mnist, wordnet, csv:PATH or wds:PATTERN, "
                     f"got {spec!r}")


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
        from .files.stream import FileOptions, file_eval_set

        opts = FileOptions.from_config(cfg) if cfg is not None else FileOptions()
        opts.eval_size, opts.pixels = limit, pixels
        return file_eval_set(kind, path, image_size, opts)
    return build_data(spec, image_size, seed, pixels=pixels).eval_set()


def state_of(stream: Any) -> dict[str, Any]:
    """A stream's resumable position beyond the step (empty for index-addressed streams)."""
    fn = getattr(stream, "state_dict", None)
    return fn() if callable(fn) else {}
