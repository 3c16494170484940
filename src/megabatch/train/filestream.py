"""Training streams and evaluation sets over users' files: CSV/TSV tables and webdataset shards.

Wraps the readers of `megabatch.train.files` (which split rows/shards by rank, shuffle per epoch
with the seed, loop forever, and skip and count bad items). Images are centre-cropped, resized to
(3, S, S) and normalised with CLIP's mean and std. Rank r serves its own shard: `batch()` returns
the next `stop - start` pairs of this rank's stream, so its position is the number of pairs it has
consumed; a resumed run re-reads (and discards) that many pairs to continue exactly where it was.
Captions have no fixed vocabulary: the text tower gets the byte-level tokenizer.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import EvalData
from .files import CsvPairs, TarShards

MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)


class ToTensor:
    """PIL RGB image -> (3, size, size) float32: centre square crop, bilinear resize, normalise."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Tensor:
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - MEAN) / STD


def open_pairs(kind: str, path: str, image_size: int, **kw: Any) -> Any:
    """A `files.CsvPairs` ("csv") or `files.TarShards` ("wds") yielding ((3, S, S) tensor, caption)."""
    reader = CsvPairs if kind == "csv" else TarShards
    return reader(path, transform=ToTensor(image_size), **kw)


class FileStream:
    """This rank's endless, shuffled stream of pairs from a CSV/TSV table or tar shards."""

    vocabulary: Optional[list[str]] = None

    def __init__(self, kind: str, path: str, image_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.name = f"{kind}:{path}"
        self.pairs = open_pairs(kind, path, image_size, rank=rank, world_size=world, shuffle=True, seed=seed,
                                repeat=True)
        self.consumed = 0
        self._it: Optional[Iterator[tuple[Tensor, str]]] = None

    @property
    def skipped(self) -> int:
        """Bad items skipped so far on this rank (missing/corrupt image, empty caption, ...)."""
        return self.pairs.skipped

    def _iterator(self) -> Iterator[tuple[Tensor, str]]:
        if self._it is None:
            self._it = iter(self.pairs)
            for _ in range(self.consumed):
                next(self._it)
        return self._it

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """The next stop - start pairs of this rank's stream (its shard of global batch `step`)."""
        it = self._iterator()
        items = [next(it) for _ in range(stop - start)]
        self.consumed += len(items)
        return torch.stack([im for im, _ in items]), [c for _, c in items]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed, self._it = int(state["consumed"]), None

    def eval_set(self) -> Optional[EvalData]:
        return None  # evaluate on held-out files with --eval-data


def file_eval_set(kind: str, path: str, image_size: int, limit: int) -> EvalData:
    """The first `limit` usable pairs of a table or shards, in order: retrieval only (no classes)."""
    images, captions = [], []
    for image, caption in open_pairs(kind, path, image_size):
        images.append(image)
        captions.append(caption)
        if len(images) == limit:
            break
    if not images:
        raise ValueError(f"--eval-data {kind}:{path} holds no usable image-caption pair")
    return EvalData(torch.stack(images), captions, [], f"the first {len(images)} pairs of {kind}:{path}")
