"""Data sources for `megabatch train`: what a training stream and an evaluation set look like.

A training stream serves slices of global batches: `batch(step, size, start, stop)` returns samples
[start, stop) of global batch `step` (of `size` samples) as (images (n, 3, S, S) float32, captions list[str]); rank r of
W reads [r*b, (r+1)*b) with b = B / W. Streams whose samples are a function of (seed, step, index)
(synthetic, digits) resume from the step alone; file streams also carry a `state_dict()`.

`--data` specs: "synthetic" (default), "digits", "emoji", "fashion-mnist", "wordnet" (text-text pairs: its
stream yields a definition's token ids where the others yield images; wordnet_pairs.py), "csv:PATH" (also
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
from typing import Any, Optional, Union

from ..config.data_spec import DataSection, parse_data
from .types import EvalData, Pixels, TrainStream


def build_data(data: Union[str, DataSection], image_size: int, seed: int, rank: int = 0, world: int = 1, *,
               device: Any = "cpu", pixels: Optional[Pixels] = None) -> TrainStream:
    """The training stream of `data` (a DataSection, or a bare spec such as "synthetic" read with the
    default options) for rank `rank` of `world`: images of `image_size` pixels, drawn from `seed`.

    File streams read only this rank's shard, with the section's columns, held-out split and workers,
    and put batches on `device`. With `pixels`, the stream yields a pretrained model's [0, 1] images
    (see the module docstring) and keeps `pixels` as its attribute, for the evaluation set."""
    section = data if isinstance(data, DataSection) else DataSection(parse_data(data))
    spec = section.train
    if spec.kind == "synthetic":
        from .synthetic import SyntheticShapes

        return SyntheticShapes(image_size=image_size, seed=seed, pixels=pixels)
    if spec.kind == "digits":
        from .digits import Digits

        return Digits(image_size=image_size, seed=seed, pixels=pixels)
    if spec.kind == "emoji":
        from .emoji import Emoji

        return Emoji(image_size=image_size, seed=seed, pixels=pixels)
    if spec.kind == "fashion-mnist":
        from .fashion import FashionMNIST

        return FashionMNIST(image_size=image_size, seed=seed, pixels=pixels)
    if spec.kind == "wordnet":
        from .wordnet_pairs import WordNetPairs

        return WordNetPairs(seed, section.wordnet_synsets, section.eval_size)
    from .files.stream import FileOptions, FileStream

    opts = FileOptions.from_section(section)
    opts.pixels = pixels
    stream = FileStream(spec.kind, spec.path, image_size, seed, rank, world, opts, device, section.eval is None)
    if section.batch_size and rank == 0:
        _warn_if_few_pairs(stream, section.batch_size)
    return stream


def _warn_if_few_pairs(stream: Any, batch_size: int) -> None:
    distinct = stream.distinct_pairs(batch_size)
    if distinct < batch_size:
        warnings.warn(f"{stream.name}: the training data holds {distinct} distinct pairs, fewer than the global batch "
                      f"{batch_size}: each batch repeats pairs; give more data or a smaller --batch-size", stacklevel=3)


def build_eval(section: DataSection, stream: TrainStream, image_size: int, seed: int) -> Optional[EvalData]:
    """The evaluation set: `section.eval`'s (--eval-data) if given, else the training data's own held-out
    set. At most `section.eval_size` pairs of users' files (0: all). Its images are made as the training
    stream's are (`stream.pixels`: a pretrained model's processor, or None)."""
    if section.eval is None:
        return stream.eval_set()
    pixels = getattr(stream, "pixels", None)
    if section.eval.files:
        from .files.stream import FileOptions, file_eval_set

        opts = FileOptions.from_section(section)
        opts.pixels = pixels
        return file_eval_set(section.eval.kind, section.eval.path, image_size, opts)
    return build_data(DataSection(section.eval), image_size, seed, pixels=pixels).eval_set()


def state_of(stream: Any) -> dict[str, Any]:
    """A stream's resumable position beyond the step (empty for index-addressed streams)."""
    fn = getattr(stream, "state_dict", None)
    return fn() if callable(fn) else {}
