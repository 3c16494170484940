"""The pieces a rank's stream of users' files and its evaluation sets are built from (stream.py):
how to read the files (`FileOptions`), a decoded image to uint8 (`ToUint8`) and to the model's
input (`normalize`), the readers of files.py set up for that, the held-out rows of a table
(`split_rows`), and the DataLoader dataset of chunks of pairs with their cursors (`Chunks`, `collate`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ...config.data_spec import DataSection
from ..types import DataError
from .shards import TarShards
from .tables import CsvPairs, read_table

MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)
EVAL_CAP = 5000  # a fractional --eval-split holds out at most this many pairs
SPLIT_SEED = 20251201  # the table split is part of the data, not of a run's seed


@dataclass
class FileOptions:
    """How to read users' files (the csv_*/wds_*/eval_*/workers fields of TrainConfig)."""

    image_key: Union[str, int] = "filepath"
    caption_key: Union[str, int] = "title"
    id_key: Optional[Union[str, int]] = None
    separator: Optional[str] = None
    wds_id: Optional[str] = None
    eval_split: float = 0.02
    eval_size: int = 0
    workers: int = 2
    pixels: Optional[Any] = None  # types.Pixels of a --model hf:... (its image processor), or None

    @classmethod
    def from_section(cls, data: DataSection) -> "FileOptions":
        """The options `data` gives (its columns by header name, or by 0-based position when all digits)."""
        def column(value: Optional[str], default: Optional[str]) -> Optional[Union[str, int]]:
            value = default if value is None else value
            return int(value) if value is not None and value.isdigit() else value

        return cls(column(data.csv_img_key, "filepath"), column(data.csv_caption_key, "title"),  # type: ignore[arg-type]
                   column(data.csv_id_key, None), data.csv_separator, data.wds_id_key, float(data.eval_split),
                   data.eval_size, data.workers)


class ToUint8:
    """PIL RGB image -> (3, size, size) uint8: centre square crop, bilinear resize."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Tensor:
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images: Tensor, pixels: Any = None) -> Tensor:
    """uint8 (n, 3, S, S) -> float32 with CLIP's mean and std, on the images' device ([0, 1] with
    `pixels`: the pretrained model applies its processor's)."""
    x = images.float().div_(255.0)
    if pixels is not None:
        return x
    return x.sub_(MEAN.to(x.device)).div_(STD.to(x.device))


def reader(kind: str, path: str, image_size: int, opts: FileOptions, **kw: Any) -> Any:
    """A `CsvPairs` (kw: its `table` and `rows`) or `TarShards` decoding to uint8 at `image_size`, or
    through a pretrained model's processor (`opts.pixels`); kw: the reader's other arguments."""
    transform, draft = ToUint8(image_size), image_size
    if opts.pixels is not None:
        transform, draft = opts.pixels.geometry, None
    if kind == "csv":
        return CsvPairs(kw.pop("table"), transform=transform, draft=draft, **kw)
    return TarShards(path, id_ext=opts.wds_id, transform=transform, draft=draft, **kw)


def open_table(path: str, opts: FileOptions) -> Any:
    """The table at `path`, read with the columns and separator of `opts` (files.read_table)."""
    return read_table(path, opts.image_key, opts.caption_key, opts.id_key, opts.separator)


def split_rows(n: int, eval_split: float, world: int, path: str) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of an n-row table, both in table order."""
    if eval_split <= 0:
        return list(range(n)), []
    held = int(eval_split) if eval_split >= 1 else min(EVAL_CAP, max(1, round(eval_split * n)))
    if n - held < world:
        raise DataError(f"{path}: holding out {held} of its {n} rows for evaluation (--eval-split {eval_split:g}) "
                        f"leaves {n - held} for training, fewer than the {world} rank(s); use --eval-split 0 "
                        "(or a smaller one) or give --eval-data")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


class Chunks(IterableDataset):
    """Chunks of pairs of one rank: DataLoader worker i acts as reader worker (i + rotation) % W.
    Data that cannot be used (a DataError, e.g. no usable pair in a whole epoch) ends the chunks
    with {"error": message}: from a DataLoader worker, an exception would reach the training process
    wrapped in the worker's traceback (`raise_error` raises it there as the DataError it was)."""

    def __init__(self, pairs: Any, chunk: int, cursors: list[list[int]], first: list[int], rotation: int):
        self.pairs, self.chunk, self.cursors, self.first, self.rotation = pairs, chunk, cursors, first, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._chunks()
        except DataError as e:
            yield {"error": str(e)}

    def _chunks(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (wid + self.rotation) % n
        walk = self.pairs.walk(w, n, tuple(self.cursors[w]))
        counts = self.pairs._counts[self.pairs._slot()]
        events = self.pairs.events  # this process's bad items (a list when the owner reports them)
        size = self.first[w]
        while True:
            items, bad, skips = [], [], []
            for item, cursor in itertools.islice(walk, size):
                if events:  # skipped just before this pair
                    skips += [(len(items), *e) for e in events]
                    events.clear()
                items.append((item, cursor))
                bad.append(counts.clone())
            if not items:
                return
            yield collate(w, items, torch.stack(bad), skips)
            size = self.chunk


def raise_error(chunk: dict[str, Any]) -> dict[str, Any]:
    """`chunk`, unless it is the error that ended a `Chunks` (raised here as a DataError)."""
    if "error" in chunk:
        raise DataError(chunk["error"])
    return chunk


def collate(worker: int, items: list[tuple[tuple[Any, ...], Any]], counts: Optional[Tensor] = None,
            skips: Optional[list[tuple[int, str, str, str]]] = None) -> dict[str, Any]:
    """One chunk: uint8 images, captions, int64 ids (or None), cursors, the worker's skip counts
    (cumulative, after each pair) and the bad items skipped (index of the pair after each, reason,
    where, why)."""
    has_id = len(items[0][0]) == 3
    return {
        "worker": worker,
        "images": torch.stack([it[0] for it, _ in items]),
        "captions": [it[1] for it, _ in items],
        "ids": torch.tensor([it[2] for it, _ in items], dtype=torch.int64) if has_id else None,
        "cursors": torch.tensor([list(c) for _, c in items], dtype=torch.int64),
        "counts": counts,
        "skips": skips or [],
    }
