"""Image-caption pairs from the file formats users have: a CSV/TSV table and webdataset tar shards.

    pairs = CsvPairs("data/train.tsv", image_column="filepath", caption_column="title")
    pairs = TarShards("shards/{000000..000099}.tar", rank=rank, world_size=world)
    for image, caption in pairs: ...          # PIL RGB image (or transform(image)), str

With `id_column` (CSV) / `id_ext` (tar member "<key>.<id_ext>"), items are (image, caption, id):
a per-pair int64 id, the integer written there, or `stable_id(text)` of any other text.

Both are `torch.utils.data.IterableDataset`s, streamed, and split first by rank (`rank`,
`world_size`), then by DataLoader worker: each item goes to exactly one (rank, worker). CSV rows are
split row by row; tar shards shard by shard (so `world_size` may not exceed the number of shards).
`shuffle=True` permutes rows / shard order with `seed + epoch` (`set_epoch`); `repeat=True` loops
over epochs forever (a training stream that never runs dry on one rank first). `walk()` is the
same stream for an explicit worker, with a cursor after every item, so a reader can start again
exactly after the last item used without reading the ones before it (see `filestream`).

A held-out split: a CSV reader takes the table rows it may use (`rows=`); tar shards keep or drop
the samples whose key hashes below `held_out` (`split="train"` drops them, `"eval"` keeps only them).

Bad data never crashes a run nor hangs it: a missing or corrupt image, an empty (or undecodable)
caption, a malformed CSV row and a shard that is missing, not a tar or ends early (truncated) are
skipped, counted by reason in `.counts` (summed over DataLoader workers through shared memory) and
reported with `warnings.warn`: each of the first few distinct bad items once per process (a
repeating stream meets the same bad row every epoch: it is counted every time, said once), then a
summary at the end of a pass that met new ones. An owner that reports bad items itself sets
`events` to a list: they are appended there as (reason, where, why) and not warned about (the
training stream carries its workers' events to the training process, which says each once).
Samples read from a truncated shard before the damage are kept. Tar shards follow the webdataset
layout: consecutive members "<key>.<ext>" form one sample; the image is the first of `image_exts`,
the caption the first of `caption_exts` (UTF-8). Shards are local paths (brace ranges
"{000..099}", lists "{a,b}" and globs).

Unusable input -- a missing table, a column that is not there, a table without rows, no shard at
all -- raises `DataError` (a ValueError; `MissingDataFile` is also a FileNotFoundError) naming the
file, what was found and the `megabatch train` flag that fixes it.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

REASONS = ("missing_image", "corrupt_image", "empty_caption", "bad_row", "bad_shard", "bad_id")
_SLOTS = 64  # count rows in shared memory: one per DataLoader worker id (mod _SLOTS)
_WARN_FIRST = 5  # distinct bad items warned about one by one per process; the rest in a summary
_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_FLAGS = {"image_column": "--csv-img-key", "caption_column": "--csv-caption-key", "id_column": "--csv-id-key"}
_INT64 = (-(2**63), 2**63 - 1)

Cursor = tuple[int, int, int]  # (epoch, position in this worker's units, groups passed in that unit)
Column = Union[str, int]


class DataError(ValueError):
    """Data that cannot be used as asked: the message names the file, what it holds and the flag."""


class MissingDataFile(DataError, FileNotFoundError):
    """A table or shard pattern that names nothing on disk."""


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


def key_fraction(key: str) -> float:
    """Where a sample key falls in [0, 1) (blake2b): the same in every process, run and machine."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


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
                raise RuntimeError(f"{self.name}: no usable item in a whole epoch of this worker's share ({bad})")
            epoch, pos = epoch + 1, 0

    def _skip(self, reason: str, where: str, why: object) -> None:
        self._counts[self._slot(), REASONS.index(reason)] += 1
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
        """A PIL RGB image (or transform(image)) from bytes or a path; None (counted) when bad.
        With `draft`, a JPEG is decoded at the smallest DCT scale still >= draft pixels a side."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                if self.draft is not None:
                    im.draft("RGB", (self.draft, self.draft))
                image = im.convert("RGB")
        except FileNotFoundError as e:
            self._skip("missing_image", where, e.strerror)
            return None
        except _BAD_IMAGE as e:
            self._skip("corrupt_image", where, e)
            return None
        return self.transform(image) if self.transform is not None else image


@dataclass
class Table:
    """A CSV/TSV table read once: its data rows and the 0-based columns of image, caption (and id)."""

    path: str
    rows: list[list[str]]
    image: int
    caption: int
    id: Optional[int]
    header: Optional[list[str]]

    def captions(self, rows: Optional[Sequence[int]] = None) -> list[str]:
        """The stripped captions of `rows` (default all), blank ones and short rows left out."""
        idx = range(len(self.rows)) if rows is None else rows
        out = []
        for r in idx:
            row = self.rows[r]
            if self.caption < len(row) and row[self.caption].strip():
                out.append(row[self.caption].strip())
        return out


def read_table(
    path: Union[str, os.PathLike],
    image_column: Column = "filepath",
    caption_column: Column = "title",
    id_column: Optional[Column] = None,
    delimiter: Optional[str] = None,
    header: Optional[bool] = None,
) -> Table:
    """Read and check a table. Columns are header names or 0-based positions; with positions the
    file has no header line unless `header=True`. The delimiter is a tab for .tsv/.tab files and a
    comma otherwise, unless given. Raises DataError naming the file, its columns and the flag."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = os.path.dirname(path) or "."
        raise MissingDataFile(f"CSV/TSV file {path!r} does not exist"
                              + ("" if os.path.isdir(where) else f" (no folder {where!r})"))
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, got {delimiter!r}")
    given = {"image_column": image_column, "caption_column": caption_column}
    if id_column is not None:
        given["id_column"] = id_column
    for arg, col in given.items():
        if isinstance(col, bool) or not isinstance(col, (str, int)) or isinstance(col, int) and col < 0:
            raise TypeError(f"{arg} must be a header name or a non-negative int, got {col!r}")
    names = [isinstance(c, str) for c in given.values()]
    if any(names) and not all(names):
        raise DataError(f"{path}: give the columns all by header name or all by 0-based position, got "
                        + ", ".join(f"{_FLAGS[a]} {c!r}" for a, c in given.items()))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r]  # blank lines are not rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV/TSV table ({e})") from None
    sep = {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
    head: Optional[list[str]] = None
    if header if header is not None else all(names):
        if not rows:
            raise DataError(f"{path} is empty: no header line and no rows")
        head, rows = rows[0], rows[1:]
    if all(names):
        assert head is not None
        missing = [(a, c) for a, c in given.items() if c not in head]
        if missing:
            what = "; ".join(f"{_FLAGS[a]} {c!r}" for a, c in missing)
            hint = (f" (one column only: is the separator right? it was read as {sep}; set it with --csv-separator)"
                    if len(head) == 1 else "")
            raise DataError(f"{path}: no column named {what}; its header (split on {sep}) has columns {head}{hint}. "
                            f"Name the columns with --csv-img-key and --csv-caption-key (or give 0-based positions "
                            f"for a file without a header)")
        index = {a: head.index(c) for a, c in given.items()}
    else:
        index = dict(given)  # type: ignore[arg-type]
        widest = max(index.values())
        first = rows[0] if rows else (head or [])
        if first and len(first) <= widest:
            raise DataError(f"{path}: column position {widest} is past its {len(first)} column(s) {first} (split on "
                            f"{sep}); positions count from 0: set --csv-img-key / --csv-caption-key"
                            + (" / --csv-id-key" if "id_column" in index else "") + ", or --csv-separator")
    if not rows:
        raise DataError(f"{path} has no rows" + (f" below its header {head}" if head is not None else ""))
    return Table(path, rows, index["image_column"], index["caption_column"], index.get("id_column"), head)


class CsvPairs(_Pairs):
    """(image, caption) from a CSV/TSV table of image paths (relative to the table's folder, or
    `root`) and captions; (image, caption, id) with `id_column`. Columns are header names (default
    open_clip's "filepath"/"title") or 0-based indices (see `read_table`). `path` may be a `Table`
    already read; `rows` restricts the reader to those data rows (0-based, in that order)."""

    def __init__(
        self,
        path: Union[str, os.PathLike, Table],
        *,
        image_column: Column = "filepath",
        caption_column: Column = "title",
        id_column: Optional[Column] = None,
        delimiter: Optional[str] = None,
        header: Optional[bool] = None,
        rows: Optional[Sequence[int]] = None,
        root: Optional[Union[str, os.PathLike]] = None,
        transform: Optional[Callable[[Image.Image], Any]] = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
        draft: Optional[int] = None,
    ):
        super().__init__(transform, rank, world_size, shuffle, seed, repeat, draft)
        table = path if isinstance(path, Table) else read_table(path, image_column, caption_column, id_column,
                                                                delimiter, header)
        self.table, self.name = table, os.path.basename(table.path)
        self.root = os.fspath(root) if root is not None else os.path.dirname(table.path)
        self._order = list(range(len(table.rows))) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < len(table.rows) for r in self._order):
            raise ValueError(f"rows must be data-row indices in [0, {len(table.rows)}) of {table.path}")
        if len(self._order) < world_size:
            raise ValueError(f"{table.path!r} has {len(self._order)} rows, fewer than world_size={world_size}")

    @property
    def num_rows(self) -> int:
        """Rows this reader uses (before splitting by rank/worker and skipping bad rows)."""
        return len(self._order)

    def units(self) -> int:
        return len(self._order)

    def _read(self, unit: int, skip: int) -> Iterator[tuple[tuple[Any, ...], int]]:
        if skip:
            return
        t = self.table
        n = self._order[unit]
        row, where = t.rows[n], f"row {n + 1}"
        need = max(c for c in (t.image, t.caption, t.id) if c is not None)
        if need >= len(row):
            self._skip("bad_row", where, f"{len(row)} column(s), need {need + 1}")
            return
        caption = row[t.caption].strip()
        if not caption:
            self._skip("empty_caption", where, "blank caption")
            return
        ident = None
        if t.id is not None:
            ident = parse_id(row[t.id])
            if ident is None:
                self._skip("bad_id", where, "blank id")
                return
        image = self._decode(os.path.join(self.root, row[t.image]), f"{where} ({row[t.image]})")
        if image is not None:
            yield ((image, caption) if ident is None else (image, caption, ident)), 1


class TarShards(_Pairs):
    """(image, caption) streamed from webdataset tar shards ("<key>.jpg" + "<key>.txt"), split by
    shard over ranks, then over DataLoader workers; (image, caption, id) with `id_ext` (the member
    "<key>.<id_ext>" holds the id). `urls`: a pattern or a list of patterns."""

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_exts: Sequence[str] = ("txt",),
        id_ext: Optional[str] = None,
        held_out: float = 0.0,
        split: str = "train",
        transform: Optional[Callable[[Image.Image], Any]] = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
        draft: Optional[int] = None,
    ):
        super().__init__(transform, rank, world_size, shuffle, seed, repeat, draft)
        if not 0.0 <= held_out < 1.0 or split not in ("train", "eval"):
            raise ValueError(f"need 0 <= held_out < 1 and split 'train' or 'eval', got {held_out!r}, {split!r}")
        self.shards = expand_urls(urls)
        if not any(os.path.exists(s) for s in self.shards):
            shown = self.shards[:3] + (["..."] if len(self.shards) > 3 else [])
            raise MissingDataFile(f"no shard of {urls!r} exists (looked for {shown})")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shard(s) for world_size={world_size}: every rank needs a shard")
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_exts = tuple(e.lower().lstrip(".") for e in caption_exts)
        self.id_ext = None if id_ext is None else id_ext.lower().lstrip(".")
        self.held_out, self.split = held_out, split
        self.name = os.path.commonprefix(self.shards) + "*" if len(self.shards) > 1 else self.shards[0]

    def units(self) -> int:
        return len(self.shards)

    def _wanted(self, key: str) -> bool:
        if not self.held_out:
            return self.split == "train"
        return (key_fraction(key) < self.held_out) == (self.split == "eval")

    def _read(self, unit: int, skip: int) -> Iterator[tuple[tuple[Any, ...], int]]:
        shard = self.shards[unit]
        exts = self.image_exts + self.caption_exts + ((self.id_ext,) if self.id_ext else ())
        for passed, (key, parts) in enumerate(self._groups(shard, exts, skip), start=skip + 1):
            if self._wanted(key):
                for item in self._sample(shard, key, parts):
                    yield item, passed

    def captions(self, limit: int) -> list[str]:
        """Up to `limit` captions of this split, shards in order (all ranks'; images are not read)."""
        out: list[str] = []
        for shard in self.shards:
            for key, parts in self._groups(shard, self.caption_exts, 0, quiet=True):
                raw = next((parts[e] for e in self.caption_exts if e in parts), b"")
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    continue
                if text and self._wanted(key):
                    out.append(text)
                    if len(out) >= limit:
                        return out
        return out

    def _groups(self, shard: str, exts: Sequence[str], skip: int,
                quiet: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The shard's samples after the first `skip` as (key, {ext: bytes}) (members of other
        extensions, and all members of skipped samples, are passed over unread); a damaged shard is
        counted and its partly read sample dropped. (Decoding happens outside, so its errors are
        never blamed on the shard.)"""
        key, parts, seen = None, {}, 0
        try:
            with tarfile.open(shard, mode="r:*") as tar:
                for member in tar:
                    base, _, ext = os.path.basename(member.name).partition(".")
                    k = os.path.join(os.path.dirname(member.name), base)
                    if k != key:
                        if key is not None and seen > skip:
                            yield key, parts
                        key, parts, seen = k, {}, seen + 1
                    ext = ext.lower()
                    if seen > skip and member.isfile() and ext in exts:
                        parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                # tarfile stops quietly at a header cut short: a whole shard ends with a zero block.
                tar.fileobj.seek(tar.offset)  # type: ignore[union-attr]
                end = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
                if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"ends early at byte {tar.offset} (no end-of-archive block)")
        except (OSError, EOFError, tarfile.TarError) as e:
            if not quiet:
                self._skip("bad_shard", f"shard {shard}", e)
            return
        if key is not None and seen > skip:
            yield key, parts

    def _sample(self, shard: str, key: str, parts: dict[str, bytes]) -> Iterator[tuple[Any, ...]]:
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
        ident = None
        if self.id_ext is not None:
            try:
                ident = parse_id(parts.get(self.id_ext, b"").decode("utf-8"))
            except UnicodeDecodeError:
                ident = None
            if ident is None:
                self._skip("bad_id", where, f"no usable .{self.id_ext} member")
                return
        decoded = self._decode(image, where)
        if decoded is not None:
            yield (decoded, caption) if ident is None else (decoded, caption, ident)


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
                    raise MissingDataFile(f"no shard matches {path!r}")
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
