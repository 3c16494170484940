"""Image-caption pairs from the file formats users have: a CSV/TSV table and webdataset tar shards.

    pairs = CsvPairs("data/train.tsv", image_column="filepath", caption_column="title")
    pairs = TarShards("shards/{000000..000099}.tar", rank=rank, world_size=world)
    for image, caption in pairs: ...          # PIL RGB image (or transform(image)), str

Both are `torch.utils.data.IterableDataset`s, streamed, and split first by rank (`rank`,
`world_size`), then by DataLoader worker: each item goes to exactly one (rank, worker). CSV rows are
split row by row; tar shards shard by shard (so `world_size` may not exceed the number of shards).
`shuffle=True` permutes rows / shard order with `seed + epoch` (`set_epoch`); `repeat=True` loops
over epochs forever (a training stream that never runs dry on one rank first).

Bad data never crashes a run nor hangs it: a missing or corrupt image, an empty (or undecodable)
caption, a malformed CSV row and a shard that is missing, not a tar or ends early (truncated) are
skipped, counted by reason in `.counts` (summed over DataLoader workers through shared memory) and
reported with `warnings.warn` (each of the first few, then a summary per pass). Samples read from a
truncated shard before the damage are kept. Tar shards follow the webdataset layout: consecutive
members "<key>.<ext>" form one sample; the image is the first of `image_exts`, the caption the first
of `caption_exts` (UTF-8). Shards are local paths (brace ranges "{000..099}", lists "{a,b}" and globs).
"""
from __future__ import annotations

import csv
import glob
import io
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

REASONS = ("missing_image", "corrupt_image", "empty_caption", "bad_row", "bad_shard")
_SLOTS = 64  # count rows in shared memory: one per DataLoader worker id (mod _SLOTS)
_WARN_FIRST = 5  # bad items warned about one by one per process and pass; the rest in a summary
_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Pairs(IterableDataset):
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
    ):
        for arg, value in (("rank", rank), ("world_size", world_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform, self.rank, self.world_size = transform, rank, world_size
        self.shuffle, self.seed, self.repeat, self.epoch = shuffle, seed, repeat, 0
        self._counts = torch.zeros(_SLOTS, len(REASONS), dtype=torch.int64).share_memory_()
        self._warned = 0  # per process and pass

    @property
    def counts(self) -> dict[str, int]:
        """Items skipped so far, by reason, over all passes and DataLoader workers."""
        return dict(zip(REASONS, self._counts.sum(0).tolist()))

    @property
    def skipped(self) -> int:
        """Total items skipped so far (the sum of `counts`)."""
        return int(self._counts.sum())

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next pass (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def _units(self) -> int:
        raise NotImplementedError

    def _read(self, unit: int) -> Iterator[tuple[Any, str]]:
        raise NotImplementedError

    def _mine(self, epoch: int) -> list[int]:
        """This (rank, worker)'s units for one epoch: shuffled, split by rank, then by worker."""
        order = list(range(self._units()))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return order[self.rank :: self.world_size][worker::workers]

    @staticmethod
    def _slot() -> int:
        info = get_worker_info()
        return (info.id if info is not None else 0) % _SLOTS

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        epoch = self.epoch
        self._warned = 0
        while True:
            mine = self._mine(epoch)
            if not mine:
                return  # this worker has nothing (more workers than units): end, never spin
            mine_counts = self._counts[self._slot()]
            before, yielded = mine_counts.clone(), 0
            for unit in mine:
                for item in self._read(unit):
                    yielded += 1
                    yield item
            bad = {r: int(n) for r, n in zip(REASONS, mine_counts - before) if n}
            if bad:
                warnings.warn(f"{self.name}: skipped {sum(bad.values())} bad item(s) in epoch {epoch}: {bad}")
            if not self.repeat:
                return
            if yielded == 0:
                raise RuntimeError(f"{self.name}: no usable item in a whole epoch of this worker's share ({bad})")
            epoch += 1

    def _skip(self, reason: str, where: str, why: object) -> None:
        self._counts[self._slot(), REASONS.index(reason)] += 1
        self._warned += 1
        if self._warned <= _WARN_FIRST:
            more = " (further ones are summarised at the end of the epoch)" if self._warned == _WARN_FIRST else ""
            warnings.warn(f"{self.name}: skipping {where}: {reason} ({why}){more}")

    def _decode(self, data: Union[bytes, str], where: str) -> Optional[Any]:
        """A PIL RGB image (or transform(image)) from bytes or a path; None (counted) when bad."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                image = im.convert("RGB")
        except FileNotFoundError as e:
            self._skip("missing_image", where, e.strerror)
            return None
        except _BAD_IMAGE as e:
            self._skip("corrupt_image", where, e)
            return None
        return self.transform(image) if self.transform is not None else image


class CsvPairs(_Pairs):
    """(image, caption) from a CSV/TSV table of image paths (relative to the table's folder, or
    `root`) and captions. Columns are header names (default open_clip's "filepath"/"title") or
    0-based indices; with indices the file has no header unless `header=True`. The delimiter is a
    tab for .tsv/.tab files and a comma otherwise, unless given. The table is read at construction."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        image_column: Union[str, int] = "filepath",
        caption_column: Union[str, int] = "title",
        delimiter: Optional[str] = None,
        header: Optional[bool] = None,
        root: Optional[Union[str, os.PathLike]] = None,
        transform: Optional[Callable[[Image.Image], Any]] = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
    ):
        super().__init__(transform, rank, world_size, shuffle, seed, repeat)
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CSV/TSV file {path!r} does not exist")
        if delimiter is None:
            delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
        self.name, self.root = os.path.basename(path), os.fspath(root) if root is not None else os.path.dirname(path)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        names = all(isinstance(c, str) for c in (image_column, caption_column))
        if header if header is not None else names:
            columns, rows = (rows[0] if rows else []), rows[1:]
            if names:
                for arg, col in (("image_column", image_column), ("caption_column", caption_column)):
                    if col not in columns:
                        raise ValueError(f"{arg}={col!r} is not a column of {path!r}; its header is {columns}")
                image_column, caption_column = columns.index(image_column), columns.index(caption_column)
        elif names:
            raise ValueError("image_column/caption_column given by name need header=True")
        for arg, col in (("image_column", image_column), ("caption_column", caption_column)):
            if isinstance(col, bool) or not isinstance(col, int) or col < 0:
                raise TypeError(f"{arg} must be a header name or a non-negative int, got {col!r}")
        self._columns = (image_column, caption_column)
        self._rows = [r for r in rows if r]  # blank lines are not rows
        if len(self._rows) < world_size:
            raise ValueError(f"{path!r} has {len(self._rows)} rows, fewer than world_size={world_size}")

    @property
    def num_rows(self) -> int:
        """Rows in the whole table (before splitting by rank/worker and skipping bad rows)."""
        return len(self._rows)

    def _units(self) -> int:
        return len(self._rows)

    def _read(self, unit: int) -> Iterator[tuple[Any, str]]:
        row, (i, c) = self._rows[unit], self._columns
        where = f"row {unit + 1}"
        if max(i, c) >= len(row):
            self._skip("bad_row", where, f"{len(row)} column(s), need {max(i, c) + 1}")
            return
        caption = row[c].strip()
        if not caption:
            self._skip("empty_caption", where, "blank caption")
            return
        image = self._decode(os.path.join(self.root, row[i]), f"{where} ({row[i]})")
        if image is not None:
            yield image, caption


class TarShards(_Pairs):
    """(image, caption) streamed from webdataset tar shards ("<key>.jpg" + "<key>.txt"), split by
    shard over ranks, then over DataLoader workers. `urls`: a pattern or a list of patterns."""

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_exts: Sequence[str] = ("txt",),
        transform: Optional[Callable[[Image.Image], Any]] = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
    ):
        super().__init__(transform, rank, world_size, shuffle, seed, repeat)
        self.shards = expand_urls(urls)
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shard(s) for world_size={world_size}: every rank needs a shard")
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_exts = tuple(e.lower().lstrip(".") for e in caption_exts)
        self.name = os.path.commonprefix(self.shards) + "*" if len(self.shards) > 1 else self.shards[0]

    def _units(self) -> int:
        return len(self.shards)

    def _read(self, unit: int) -> Iterator[tuple[Any, str]]:
        shard = self.shards[unit]
        for key, parts in self._groups(shard):
            yield from self._sample(shard, key, parts)

    def _groups(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The shard's samples as (key, {ext: bytes}); a damaged shard is counted and its partly read
        sample dropped. (Decoding happens outside, so its errors are never blamed on the shard.)"""
        key, parts = None, {}
        try:
            with tarfile.open(shard, mode="r:*") as tar:
                for member in tar:
                    base, _, ext = os.path.basename(member.name).partition(".")
                    k = os.path.join(os.path.dirname(member.name), base)
                    if k != key:
                        if key is not None:
                            yield key, parts
                        key, parts = k, {}
                    ext = ext.lower()
                    if member.isfile() and (ext in self.image_exts or ext in self.caption_exts):
                        parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                # tarfile stops quietly at a header cut short: a whole shard ends with a zero block.
                tar.fileobj.seek(tar.offset)  # type: ignore[union-attr]
                end = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
                if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"ends early at byte {tar.offset} (no end-of-archive block)")
        except (OSError, EOFError, tarfile.TarError) as e:
            self._skip("bad_shard", f"shard {shard}", e)
            return
        if key is not None:
            yield key, parts

    def _sample(self, shard: str, key: str, parts: dict[str, bytes]) -> Iterator[tuple[Any, str]]:
        where = f"sample {key!r} in {shard}"
        image = next((parts[e] for e in self.image_exts if e in parts), None)
        if image is None:
            self._skip("missing_image", where, f"no {'/'.join(self.image_exts)} member")
            return
        raw = next((parts[e] for e in self.caption_exts if e in parts), b"")
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            self._skip("empty_caption", where, f"caption is not UTF-8: {e}")
            return
        if not caption:
            self._skip("empty_caption", where, "empty or missing caption")
            return
        decoded = self._decode(image, where)
        if decoded is not None:
            yield decoded, caption


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_urls(urls: Union[str, Sequence[str]]) -> list[str]:
    """Shard paths from patterns: "{000..099}" ranges (zero padding kept), "{a,b}" lists, globs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"urls must be a non-empty path pattern or list of them, got {urls!r}")
    out: list[str] = []
    for pattern in patterns:
        for path in _braces(pattern):
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise ValueError(f"no shard matches {path!r}")
                out.extend(found)
            else:
                out.append(path)
    return out


def _braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        if hi < lo:
            raise ValueError(f"empty range {{{body}}} in {pattern!r}")
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in _braces(head + o + tail)]
