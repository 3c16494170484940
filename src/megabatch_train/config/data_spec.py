"""The data a run reads, parsed once: `DataSpec` is one `--data` / `--eval-data` value, `DataSection` is
everything the data builders (data/sources.py) take from a run's config. Standard library only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BUILT_IN_DATA = ("synthetic", "digits", "emoji", "fashion-mnist", "wordnet")
FILE_KINDS = ("csv", "wds")  # users' files: csv:PATH (a CSV/TSV table), wds:PATTERN (webdataset tar shards)


@dataclass(frozen=True)
class DataSpec:
    """One data spec: a built-in source (`kind` one of BUILT_IN_DATA, `path` "") or users' files
    (`kind` "csv" with a table's path, or "wds" with a shard pattern)."""

    kind: str
    path: str = ""

    @property
    def files(self) -> bool:
        """Whether the spec names users' files (csv or wds), not a built-in source."""
        return self.kind in FILE_KINDS

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.files else self.kind


def parse_data(text: Optional[str], flag: str = "--data") -> DataSpec:
    """`text` ("synthetic", "csv:train.tsv", "wds:shards/{000..009}.tar", ...) as a DataSpec; a ValueError
    naming `flag` for anything else (a kind without its path included)."""
    kind, _, path = (text or "").partition(":")
    if text in BUILT_IN_DATA:
        return DataSpec(text)
    if kind in FILE_KINDS and path:
        return DataSpec(kind, path)
    raise ValueError(f"{flag} must be {', '.join(BUILT_IN_DATA)}, csv:PATH or wds:PATTERN; got {text!r}")


@dataclass(frozen=True)
class DataSection:
    """What the data builders take from a run's config: the training and evaluation specs, and how to
    read them (users' files' columns, held-out split and loader workers; WordNet's share)."""

    train: DataSpec
    eval: Optional[DataSpec] = None  # None: the training data's own held-out split
    eval_size: int = 0  # evaluate on at most this many pairs of files / held-out WordNet synsets (0: all)
    wordnet_synsets: int = 0  # --data wordnet: train on this many synsets (0: all)
    csv_img_key: Optional[str] = None  # header name or 0-based position; None: "filepath"
    csv_caption_key: Optional[str] = None  # None: "title"
    csv_id_key: Optional[str] = None
    csv_separator: Optional[str] = None  # None: tab for .tsv/.tab, comma otherwise
    wds_id_key: Optional[str] = None
    eval_split: float = 0.02  # held out of files without --eval-data: a fraction (< 1) or a count
    workers: int = 2  # DataLoader worker processes per rank reading files
    batch_size: int = 0  # the global batch (a warning when the files hold fewer distinct pairs); 0: no check
