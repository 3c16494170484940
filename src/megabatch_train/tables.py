"""CSV/TSV tables of image paths and captions: `read_table` reads and checks one (columns by header
name or 0-based position, the separator by extension), `CsvPairs` streams its rows as pairs (see
files.py for the splitting, shuffling and bad-row accounting every reader shares).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from PIL import Image

from .datatypes import DataError, MissingDataFile
from .pairs import Pairs, parse_id

_FLAGS = {"image_column": "--csv-img-key", "caption_column": "--csv-caption-key", "id_column": "--csv-id-key"}

Column = Union[str, int]


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


class CsvPairs(Pairs):
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
