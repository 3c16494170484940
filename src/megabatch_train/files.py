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

Unusable input -- a missing table, a folder given as a table or shard, a column that is not there,
a table without rows, a table none of whose images exists (image paths are relative to the table's
folder, or absolute), no shard at all, and a repeating stream with no usable item in a whole epoch
of a worker's share -- raises `DataError` (a ValueError; `MissingDataFile` is also a
FileNotFoundError) naming the file, what was found (the first bad item and why, a missing image's
resolved path) and the `megabatch train` flag or rule that fixes it.

Images come out RGB from any mode Pillow opens (`to_rgb`): transparency composited over white,
16-bit greys scaled to 8 bits, the rest (CMYK, palette, L, ...) by Pillow's conversion.

This module is where the readers are imported from; they live in tables.py (CSV/TSV), shards.py (tar)
and pairs.py (what both share), the error types in datatypes.py.
"""
from __future__ import annotations

from .datatypes import DataError, MissingDataFile
from .pairs import REASONS, Cursor, Pairs, key_fraction, parse_id, stable_id, to_rgb
from .shards import TarShards, expand_urls
from .tables import Column, CsvPairs, Table, read_table

__all__ = ["REASONS", "Column", "CsvPairs", "Cursor", "DataError", "MissingDataFile", "Pairs", "Table", "TarShards",
           "expand_urls", "key_fraction", "parse_id", "read_table", "stable_id", "to_rgb"]
