"""Webdataset tar shards: `TarShards` streams the samples of local shards ("<key>.jpg" + "<key>.txt"),
shard by shard, and `expand_urls` turns patterns ("{000..099}" ranges, "{a,b}" lists, globs) into
paths (see files.py for the splitting, shuffling and bad-item accounting every reader shares).
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

from PIL import Image

from ..types import DataError, MissingDataFile
from .pairs import Pairs, key_fraction, parse_id


class TarShards(Pairs):
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
        folder = next((s for s in self.shards if os.path.isdir(s)), None)
        if folder is not None:
            inside = os.path.join(folder, "*.tar")
            there = len(glob.glob(inside))
            raise DataError(f"shard {folder!r} is a folder, not a tar file: name the shards in it, e.g. "
                            f"'{os.path.join(folder, '{000000..000099}.tar')}' or '{inside}' "
                            + (f"({there} .tar file(s) there)" if there else "(no .tar file there)"))
        if not any(os.path.exists(s) for s in self.shards):
            shown = self.shards[:3] + (["..."] if len(self.shards) > 3 else [])
            raise MissingDataFile(f"no shard of {urls!r} exists (looked for {shown})")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shard(s) for world_size={world_size}: every rank needs a shard")
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_exts = tuple(e.lower().lstrip(".") for e in caption_exts)
        self.id_ext = None if id_ext is None else id_ext.lower().lstrip(".")
        self.held_out, self.split = held_out, split
        self.unreadable: Optional[str] = None  # the first shard `captions` could not read: "shard: why"
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
        """Up to `limit` captions of this split, shards in order (all ranks'; images are not read).
        The first shard that could not be read is kept in `unreadable` ("shard: why"), for the
        message when there is no caption at all."""
        out: list[str] = []
        self.unreadable = None
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
            why = _why(e)
            if not quiet:
                self._skip("bad_shard", f"shard {shard}", why)
            elif self.unreadable is None:
                self.unreadable = f"{shard}: {why}"
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


def _why(e: BaseException) -> str:
    """A shard's read error in one line (tarfile's "r:*" lists the compressions it tried, one a line)."""
    if isinstance(e, tarfile.ReadError) and "could not be opened successfully" in str(e):
        return "not a tar file (plain, gzip, bz2 or xz)"
    return " ".join(str(e).split()) or type(e).__name__


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
