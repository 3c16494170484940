"""CSV/TSV tables of image paths and captions: `read_table` reads and checks one (columns by header
name or 0-based position, the separator by extension), `CsvPairs` streams its rows as pairs (see
files.py for the splitting, shuffling and bad-row accounting every reader shares).

A table is read as spreadsheets and scripts write them: UTF-8 with or without a byte-order mark
("CSV UTF-8"), UTF-16 with its mark (a spreadsheet's "Unicode text"), any line ends, fields quoted
with `"` (a caption may hold the separator, quotes doubled, even a line break). An image path is
taken relative to the table's folder (or `root`), or as written when absolute; a table none of
whose images exists is refused when its reader is made, naming where the first one was looked for.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from PIL import Image

from ..types import DataError, MissingDataFile
from .pairs import Pairs, parse_id

_UTF16 = (b"\xff\xfe", b"\xfe\xff")  # the byte-order marks of UTF-16 LE and BE
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
    if os.path.isdir(path):
        tables = sorted(n for n in os.listdir(path) if n.lower().endswith((".csv", ".tsv", ".tab")))
        held = f" (it holds {', '.join(tables[:3])}{', ...' if len(tables) > 3 else ''})" if tables else ""
        raise DataError(f"CSV/TSV file {path!r} is a folder, not a table{held}: give the table file's path, e.g. "
                        f"csv:{os.path.join(path, tables[0] if tables else 'pairs.csv')}")
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
    with open(path, "rb") as f:
        encoding = "utf-16" if f.read(2) in _UTF16 else "utf-8-sig"  # (utf-8-sig: a mark or none)
    try:
        with open(path, newline="", encoding=encoding) as f:
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r]  # blank lines are not rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text ({e}); save it as "
                        "UTF-8 (a spreadsheet's \"CSV UTF-8\")") from None
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
        self.root_is_table_folder = root is None
        self._order = list(range(len(table.rows))) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < len(table.rows) for r in self._order):
            raise ValueError(f"rows must be data-row indices in [0, {len(table.rows)}) of {table.path}")
        if len(self._order) < world_size:
            raise ValueError(f"{table.path!r} has {len(self._order)} rows, fewer than world_size={world_size}")
        self._check_images()

    def _rule(self) -> str:
        """Where image paths are looked for (the end of a sentence "Image paths are taken ...")."""
        folder = os.path.abspath(self.root)
        return (f"relative to the table's folder {folder}" if self.root_is_table_folder else
                f"relative to root {folder}") + ", or as written when absolute"

    def _check_images(self) -> None:
        """DataError if no row of the table names an image file that exists (rows are looked at
        until the first that does: one look for a good table). The commonest cause: paths written
        relative to the working directory, not to the table's folder."""
        t, first = self.table, None
        for n, row in enumerate(t.rows):
            if t.image >= len(row) or not row[t.image].strip():
                continue  # a bad row, counted as such when read
            if os.path.isfile(os.path.join(self.root, row[t.image])):
                return
            first = first or (n, row[t.image])
        if first is None:
            return  # no row names an image: every row is a bad one, said when read
        n, cell = first
        hint = (f"; {cell!r} does exist relative to the working directory {os.getcwd()}: write the paths relative "
                f"to {os.path.abspath(self.root)}, or absolute" if not os.path.isabs(cell) and os.path.isfile(cell)
                else "")
        raise DataError(f"{t.path}: none of the images its {len(t.rows):,} row(s) name exists; the first, {cell!r} "
                        f"(row {n + 1}), was looked for at {os.path.abspath(os.path.join(self.root, cell))}. "
                        f"Image paths are taken {self._rule()}{hint}")

    def _advice(self, reason: str) -> str:
        return f"; image paths are taken {self._rule()}" if reason == "missing_image" else ""

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
