"""The part every reader of users' files shares (`tables.CsvPairs`, `shards.TarShards`):
splitting by rank, then by DataLoader worker, epochs and their shuffle, the resumable `walk`, image
decoding, and the accounting of bad items (counted in shared memory, warned about once). Also the
per-pair ids (`stable_id`, `parse_id`) and the key hash that holds samples out (`key_fraction`).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..types import DataError

REASONS = ("missing_image", "corrupt_image", "empty_caption", "bad_row", "bad_shard", "bad_id")
_SLOTS = 64  # count rows in shared memory: one per DataLoader worker id (mod _SLOTS)
_WARN_FIRST = 5  # distinct bad items warned about one by one per process; the rest in a summary
_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_INT64 = (-(2**63), 2**63 - 1)
_ALPHA = ("RGBA", "RGBa", "LA", "PA")  # modes with an alpha band ("LAB"'s A is a colour)

Cursor = tuple[int, int, int]  # (epoch, position in this worker's units, groups passed in that unit)


def stable_id(text: str) -> int:
    """A 63-bit id of `text` that is the same in every process and run (blake2b, not `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def parse_id(text: str) -> Optional[int]:
    """An id column's value: an int64 literal as is, any other non-blank text by `stable_id`."""
    text = text.strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        return stable_id(text)
    return value if _INT64[0] <= value <= _INT64[1] else stable_id(text)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, whatever mode Pillow opened it in: transparency (an alpha band, a palette's or
    a "transparency" colour) composited over white; 16-bit and 32-bit integer greys ("I;16*", "I")
    scaled from 0..65535 to 0..255 (Pillow's own conversion clips them, most to white); the rest
    (CMYK, YCbCr, palette, "1", "L", "F", ...) by Pillow's conversion. Always a new image (the
    caller may close `image`)."""
    mode = image.mode
    palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in _ALPHA or palette_alpha or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def key_fraction(key: str) -> float:
    """Where a sample key falls in [0, 1) (blake2b): the same in every process, run and machine."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


class Pairs(IterableDataset):
    """Rank/worker splitting, epochs, bad-item accounting; subclasses provide the units and reading."""

    name = "pairs"

    def __init__(
        self,
        transform: Optional[Callable[[Image.Image], Any]],
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        repeat: bool,
        draft: Optional[int] = None,
    ):
        for arg, value in (("rank", rank), ("world_size", world_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if draft is not None and (isinstance(draft, bool) or not isinstance(draft, int) or draft < 1):
            raise ValueError(f"draft must be a positive int (pixels) or None, got {draft!r}")
        self.transform, self.rank, self.world_size = transform, rank, world_size
        self.shuffle, self.seed, self.repeat, self.epoch, self.draft = shuffle, seed, repeat, 0, draft
        self._counts = torch.zeros(_SLOTS, len(REASONS), dtype=torch.int64).share_memory_()
        self.events: Optional[list[tuple[str, str, str]]] = None  # a list: bad items go there, unwarned
        self._seen: set[str] = set()  # distinct bad items met in this process (where they are)
        self._first_bad: Optional[tuple[str, str, str]] = None  # of this pass: said if the pass has no good item

    @property
    def counts(self) -> dict[str, int]:
        """Items skipped so far, by reason, over all passes and DataLoader workers."""
        return dict(zip(REASONS, self._counts.sum(0).tolist()))

    @property
    def skipped(self) -> int:
        """Total items skipped so far (the sum of `counts`)."""
        return int(self._counts.sum())

    def add_counts(self, counts: dict[str, int]) -> None:
        """Carry skip counts over from an earlier process (a resumed run)."""
        for reason, n in counts.items():
            self._counts[0, REASONS.index(reason)] += int(n)

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next pass (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def units(self) -> int:
        """Rows (CSV) or shards (tar) in one pass over all ranks."""
        raise NotImplementedError

    def _read(self, unit: int, skip: int) -> Iterator[tuple[tuple[Any, ...], int]]:
        """Unit `unit`'s good items after its first `skip` groups, each with the groups passed so far."""
        raise NotImplementedError

    def _mine(self, epoch: int, worker: Optional[int] = None, workers: Optional[int] = None) -> list[int]:
        """This (rank, worker)'s units for one epoch: shuffled, split by rank, then by worker."""
        order = list(range(self.units()))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if worker is None or workers is None:
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return order[self.rank :: self.world_size][worker::workers]

    def units_of_rank(self) -> int:
        """How many units this rank reads per pass (the most DataLoader workers that all get one)."""
        return len(range(self.rank, self.units(), self.world_size))

    @staticmethod
    def _slot() -> int:
        info = get_worker_info()
        return (info.id if info is not None else 0) % _SLOTS

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for item, _ in self.walk(worker, workers, (self.epoch, 0, 0)):
            yield item

    def walk(self, worker: int, workers: int, start: Cursor) -> Iterator[tuple[tuple[Any, ...], Cursor]]:
        """Worker `worker` of `workers`'s items from cursor `start` on, each with the cursor after it."""
        epoch, pos, skip = (int(v) for v in start)
        while True:
            mine = self._mine(epoch, worker, workers)
            if not mine:
                return  # this worker has nothing (more workers than units): end, never spin
            mine_counts = self._counts[self._slot()]
            before, known, yielded, whole = mine_counts.clone(), len(self._seen), 0, pos == 0 and skip == 0
            self._first_bad = None
            for p in range(pos, len(mine)):
                for item, passed in self._read(mine[p], skip):
                    yielded += 1
                    yield item, (epoch, p, passed)
                skip = 0
            bad = {r: int(n) for r, n in zip(REASONS, mine_counts - before) if n}
            if bad and len(self._seen) > known:  # a pass that met new bad items (not every epoch again)
                warnings.warn(f"{self.name}: skipped {sum(bad.values())} bad item(s) in epoch {epoch}: {bad}")
            if not self.repeat:
                return
            if yielded == 0 and whole:
                first = ""
                if self._first_bad is not None:
                    reason, where, why = self._first_bad
                    first = f"; the first: {where}: {reason} ({why}){self._advice(reason)}"
                raise DataError(f"{self.name}: no usable item in a whole epoch of this worker's share (skipped "
                                f"{bad}){first}")
            epoch, pos = epoch + 1, 0

    def _advice(self, reason: str) -> str:
        """What to check when every item of a pass was skipped for `reason` (the readers' own rules)."""
        return ""

    def _skip(self, reason: str, where: str, why: object) -> None:
        self._counts[self._slot(), REASONS.index(reason)] += 1
        if self._first_bad is None:
            self._first_bad = (reason, where, str(why))
        if self.events is not None:
            self.events.append((reason, where, str(why)))
            return
        if where in self._seen:
            return  # met again (a later epoch): counted, already said
        self._seen.add(where)
        if len(self._seen) <= _WARN_FIRST:
            more = " (further ones are summarised at the end of the epoch)" if len(self._seen) == _WARN_FIRST else ""
            warnings.warn(f"{self.name}: skipping {where}: {reason} ({why}){more}")

    def _decode(self, data: Union[bytes, str], where: str) -> Optional[Any]:
        """A PIL RGB image (`to_rgb`; or transform(image)) from bytes or a path; None (counted) when
        bad. With `draft`, a JPEG is decoded at the smallest DCT scale still >= draft pixels a side."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                if self.draft is not None:
                    im.draft("RGB", (self.draft, self.draft))
                image = to_rgb(im)
        except FileNotFoundError as e:
            self._skip("missing_image", where, e.strerror if isinstance(data, bytes) else f"{e.strerror}: "
                       f"{os.path.abspath(data)}")
            return None
        except _BAD_IMAGE as e:
            self._skip("corrupt_image", where, e)
            return None
        return self.transform(image) if self.transform is not None else image
