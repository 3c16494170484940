"""Training streams and evaluation sets over users' files: CSV/TSV tables and webdataset shards.

Wraps the readers of `megabatch.train.files` (which split rows/shards by rank, then by worker,
shuffle per epoch with the seed, loop forever, and skip and count bad items).

Loading. Each rank reads its share through a torch DataLoader with `workers` processes (0: in the
training process), persistent, prefetching, with pinned memory on CUDA. A worker decodes whole
chunks of `CHUNK` pairs (centre crop, resize, uint8; JPEGs decoded at a reduced DCT scale when
that is still at least the model's size); the training process takes chunks in the DataLoader's
fixed round-robin order over workers, moves them to the device and normalises them there with
CLIP's mean and std. The pairs of a rank are therefore a function of (seed, workers, world size).

Resume. Every pair carries its worker's cursor (epoch, unit, groups passed); the state is the
cursor after the last pair used for each worker, which worker's chunk comes next and how much of
it is left. A resumed stream starts each worker at its cursor (no consumed pair is decoded again;
tar shards skip members unread) and rotates worker ids so the round-robin order goes on unchanged.

Held-out evaluation. Without --eval-data, `eval_split` of the data is held out and never trained
on: for a table, a fixed random set of rows (fraction, at most 5,000 rows, or a count); for shards,
the samples whose key hashes below the fraction (the evaluation set is the first 5,000 of them).
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import EvalData
from .files import REASONS, CsvPairs, DataError, TarShards, read_table
from .preempt import shield_loader_worker
from .report import percent

MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)
CHUNK = 128  # pairs a worker decodes per DataLoader item
PREFETCH = 4  # chunks each worker keeps ready
EVAL_CAP = 5000  # a fractional --eval-split holds out at most this many pairs
TOKENIZER_SAMPLE = 100_000  # training captions the BPE learns from (and the context is fitted to)
_SPLIT_SEED = 20251201  # the table split is part of the data, not of a run's seed


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

    @classmethod
    def from_config(cls, cfg: Any) -> "FileOptions":
        def column(value: Optional[str], default: Optional[str]) -> Optional[Union[str, int]]:
            value = default if value is None else value
            return int(value) if value is not None and value.isdigit() else value

        return cls(column(cfg.csv_img_key, "filepath"), column(cfg.csv_caption_key, "title"),  # type: ignore[arg-type]
                   column(cfg.csv_id_key, None), cfg.csv_separator, cfg.wds_id_key, float(cfg.eval_split),
                   cfg.eval_size, cfg.workers)


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


def normalize(images: Tensor) -> Tensor:
    """uint8 (n, 3, S, S) -> float32 with CLIP's mean and std, on the images' device."""
    x = images.float().div_(255.0)
    return x.sub_(MEAN.to(x.device)).div_(STD.to(x.device))


def _reader(kind: str, path: str, image_size: int, opts: FileOptions, **kw: Any) -> Any:
    transform, draft = ToUint8(image_size), image_size
    if kind == "csv":
        return CsvPairs(kw.pop("table"), transform=transform, draft=draft, **kw)
    return TarShards(path, id_ext=opts.wds_id, transform=transform, draft=draft, **kw)


def open_table(path: str, opts: FileOptions) -> Any:
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
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


class _Chunks(IterableDataset):
    """Chunks of pairs of one rank: DataLoader worker i acts as reader worker (i + rotation) % W."""

    def __init__(self, pairs: Any, chunk: int, cursors: list[list[int]], first: list[int], rotation: int):
        self.pairs, self.chunk, self.cursors, self.first, self.rotation = pairs, chunk, cursors, first, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (wid + self.rotation) % n
        walk = self.pairs.walk(w, n, tuple(self.cursors[w]))
        counts = self.pairs._counts[self.pairs._slot()]
        size = self.first[w]
        while True:
            items, bad = [], []
            for item, cursor in itertools.islice(walk, size):
                items.append((item, cursor))
                bad.append(counts.clone())
            if not items:
                return
            yield collate(w, items, torch.stack(bad))
            size = self.chunk


def collate(worker: int, items: list[tuple[tuple[Any, ...], Any]], counts: Optional[Tensor] = None) -> dict[str, Any]:
    """One chunk: uint8 images, captions, int64 ids (or None), cursors and the worker's skip counts
    (cumulative, after each pair)."""
    has_id = len(items[0][0]) == 3
    return {
        "worker": worker,
        "images": torch.stack([it[0] for it, _ in items]),
        "captions": [it[1] for it, _ in items],
        "ids": torch.tensor([it[2] for it, _ in items], dtype=torch.int64) if has_id else None,
        "cursors": torch.tensor([list(c) for _, c in items], dtype=torch.int64),
        "counts": counts,
    }


class FileStream:
    """This rank's endless, shuffled stream of pairs from a CSV/TSV table or tar shards.

    `batch()` serves the training loop; `batch_with_ids()` also returns the pairs' int64 ids (n,)
    when `--csv-id-key` / `--wds-id-key` is set (else None). `eval_set()` is the held-out split.
    """

    vocabulary: Optional[list[str]] = None

    def __init__(self, kind: str, path: str, image_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 options: Optional[FileOptions] = None, device: Union[str, torch.device] = "cpu",
                 held_out: bool = True):
        opts = options or FileOptions()
        self.name, self.kind, self.path, self.opts = f"{kind}:{path}", kind, path, opts
        self.image_size, self.device = image_size, torch.device(device)
        split = opts.eval_split if held_out else 0.0
        self.eval_rows: list[int] = []
        try:
            if kind == "csv":
                self.table = open_table(path, opts)
                train_rows, self.eval_rows = split_rows(len(self.table.rows), split, world, path)
                self.pairs = _reader(kind, path, image_size, opts, table=self.table, rows=train_rows, rank=rank,
                                     world_size=world, shuffle=True, seed=seed, repeat=True)
            else:
                if split >= 1:
                    raise DataError(f"--eval-split {split:g}: shards hold out a fraction of their samples (by key); "
                                    "give a fraction < 1, 0, or --eval-data")
                self.pairs = _reader(kind, path, image_size, opts, held_out=split, split="train", rank=rank,
                                     world_size=world, shuffle=True, seed=seed, repeat=True)
        except DataError:
            raise
        except ValueError as e:  # e.g. fewer rows or shards than ranks
            raise DataError(f"--data {kind}:{path}: {e}") from None
        self.held_out = split
        self.workers = max(1, min(opts.workers, self.pairs.units_of_rank()))
        self.in_process = opts.workers == 0
        self.consumed = 0
        self._cursors = [[0, 0, 0] for _ in range(self.workers)]
        self._next, self._left = 0, 0
        self._bad = torch.zeros(self.workers, len(REASONS), dtype=torch.int64)  # per worker, as consumed
        self._carried = torch.zeros(len(REASONS), dtype=torch.int64)  # from before a resume
        self._buf: Optional[dict[str, Any]] = None
        self._offset = 0
        self._it: Optional[Iterator[dict[str, Any]]] = None
        self._loader: Optional[DataLoader] = None

    # -- what the run reports ----------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Bad items skipped before the pairs used so far, by reason (deterministic: not prefetch)."""
        return dict(zip(REASONS, (self._bad.sum(0) + self._carried).tolist()))

    @property
    def skipped(self) -> int:
        """Bad items skipped so far on this rank (missing/corrupt image, empty caption, ...)."""
        return int(self._bad.sum() + self._carried.sum())

    def training_captions(self, limit: int = TOKENIZER_SAMPLE) -> list[str]:
        """Captions the tokenizer learns from: training pairs only, the same on every rank."""
        if self.kind == "csv":
            rows = self.pairs._order
            if len(rows) > limit:
                rows = sorted(np.random.default_rng(_SPLIT_SEED + 1).choice(rows, limit, replace=False).tolist())
            return self.table.captions(rows)
        return self.pairs.captions(limit)

    # -- the stream ------------------------------------------------------------------------------
    def _start(self) -> Iterator[dict[str, Any]]:
        first = [CHUNK] * self.workers
        if self._left:
            first[self._next] = self._left
        chunks = _Chunks(self.pairs, CHUNK, [list(c) for c in self._cursors], first, self._next)
        if self.in_process:
            return iter(chunks)
        self._loader = DataLoader(chunks, batch_size=None, num_workers=self.workers, persistent_workers=True,
                                  prefetch_factor=PREFETCH, pin_memory=self.device.type == "cuda",
                                  worker_init_fn=shield_loader_worker)  # the trainer decides when to stop
        return iter(self._loader)

    def _take(self, n: int) -> list[dict[str, Any]]:
        """The next n pairs as slices of chunks."""
        if self._it is None:
            self._it = self._start()
        pieces = []
        while n:
            if self._buf is None:
                self._buf, self._offset = next(self._it), 0
            buf, lo = self._buf, self._offset
            hi = min(len(buf["captions"]), lo + n)
            pieces.append({k: (v[lo:hi] if k in ("images", "captions", "ids") and v is not None else v)
                           for k, v in buf.items()})
            w = buf["worker"]
            self._cursors[w] = buf["cursors"][hi - 1].tolist()
            self._bad[w] = buf["counts"][hi - 1]  # cumulative in this worker since the stream started
            n -= hi - lo
            if hi == len(buf["captions"]):
                self._buf, self._next, self._left = None, (w + 1) % self.workers, 0
            else:
                self._offset, self._next, self._left = hi, w, len(buf["captions"]) - hi
        return pieces

    def batch_with_ids(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str], Optional[Tensor]]:
        """The next stop - start pairs: images (n, 3, S, S) float32 on the device, captions, and int64
        ids (n,) when an id column/member is set (else None)."""
        pieces = self._take(stop - start)
        self.consumed += stop - start
        dev = self.device
        images = torch.cat([p["images"].to(dev, non_blocking=True) for p in pieces])
        captions = [c for p in pieces for c in p["captions"]]
        ids = torch.cat([p["ids"] for p in pieces]) if pieces[0]["ids"] is not None else None
        return normalize(images), captions, ids

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """The next stop - start pairs of this rank's stream (its shard of global batch `step`)."""
        images, captions, _ = self.batch_with_ids(step, size, start, stop)
        return images, captions

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "workers": self.workers, "cursors": [list(c) for c in self._cursors],
                "next": self._next, "left": self._left, "skipped": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "cursors" not in state:
            raise ValueError("this checkpoint's file-stream position is from an older megabatch (a pair count "
                             "only); it cannot be resumed exactly")
        if state["workers"] != self.workers:
            raise ValueError(f"the checkpoint's stream was read by {state['workers']} worker(s) per rank, this run "
                             f"by {self.workers}: resume with the same --workers")
        self.consumed, self._cursors = int(state["consumed"]), [list(c) for c in state["cursors"]]
        self._next, self._left = int(state["next"]), int(state["left"])
        self._carried = torch.tensor([state["skipped"].get(r, 0) for r in REASONS], dtype=torch.int64)
        self._bad.zero_()
        self.pairs._counts.zero_()  # the workers' cumulative counts start again with the new stream
        self._buf, self._it, self._loader = None, None, None

    # -- evaluation ------------------------------------------------------------------------------
    def eval_set(self) -> Optional[EvalData]:
        """The held-out split (None when --eval-split is 0 or --eval-data was given)."""
        if not self.held_out:
            return None
        try:
            return self._held_out_set()
        except DataError as e:
            raise DataError(f"{e}; hold out more with --eval-split, none with --eval-split 0, or give --eval-data"
                            ) from None

    def _held_out_set(self) -> EvalData:
        if self.kind == "csv":
            n, rows = len(self.table.rows), self.eval_rows
            share = (f"{percent(self.held_out)} of its {n:,} rows, at most {EVAL_CAP:,}" if self.held_out < 1
                     else "--eval-split")
            how = f"held out of {self.path} ({share}), never trained on"
            return load_eval(self.kind, self.path, self.image_size, self.opts, how, table=self.table, rows=rows)
        how = (f"held out of {self.path}: the samples whose key hashes below {self.held_out:g} (never trained on), "
               f"the first {EVAL_CAP:,} at most in shard order")
        return load_eval(self.kind, self.path, self.image_size, self.opts, how, cap=EVAL_CAP, held_out=self.held_out,
                         split="eval")


def load_eval(kind: str, path: str, image_size: int, opts: FileOptions, how: str, cap: int = 0,
              **kw: Any) -> EvalData:
    """The pairs of an evaluation reader, in order (the first --eval-size only, when set; shards
    stop at `cap`): retrieval only, no classes. The description says what was held out and any cut."""
    size, cut = opts.eval_size, ""
    if kind == "csv":
        rows = kw.pop("rows")
        if size and len(rows) > size:
            rows, cut = rows[:size], f"; cut to the first {size:,} of {len(rows):,} by --eval-size"
        pairs = _reader(kind, path, image_size, opts, rows=rows, **kw)
        chunks = _read_all_rows(pairs, opts.workers)
    else:
        limit = min(x for x in (size, cap, 2**62) if x)
        pairs = _reader(kind, path, image_size, opts, **kw)
        items = [(it, (0, 0, 0)) for it in itertools.islice(pairs, limit)]
        chunks = [collate(0, items)] if items else []
        if len(items) == limit and size == limit:
            cut = f"; cut to the first {size:,} by --eval-size"
    if not chunks:
        raise DataError(f"evaluation data {kind}:{path} holds no usable image-caption pair (skipped: {pairs.counts})")
    images = normalize(torch.cat([c["images"] for c in chunks]))
    captions = [t for c in chunks for t in c["captions"]]
    ids = torch.cat([c["ids"] for c in chunks]).numpy() if chunks[0]["ids"] is not None else None
    about = f"{len(captions):,} pairs {how}{cut}"
    if pairs.skipped:
        about += f"; {pairs.skipped} bad pair(s) skipped"
    return EvalData(images, captions, [], about, ids=ids)


def _read_all_rows(pairs: CsvPairs, workers: int) -> list[dict[str, Any]]:
    """Every row of a table reader through a DataLoader, back in row order."""
    n = max(1, min(workers, pairs.units()))
    chunks = _Chunks(pairs, CHUNK, [[0, 0, 0]] * n, [CHUNK] * n, 0)
    got = list(chunks) if workers == 0 else list(DataLoader(chunks, batch_size=None, num_workers=n))
    if not got:
        return []
    order = torch.cat([c["cursors"][:, 1] * n + c["worker"] for c in got]).argsort()
    merged = {"images": torch.cat([c["images"] for c in got])[order],
              "captions": [t for c in got for t in c["captions"]],
              "ids": torch.cat([c["ids"] for c in got])[order] if got[0]["ids"] is not None else None}
    merged["captions"] = [merged["captions"][i] for i in order.tolist()]
    return [merged]


def file_eval_set(kind: str, path: str, image_size: int, opts: FileOptions) -> EvalData:
    """--eval-data of users' files: all of their pairs (or the first --eval-size), in order."""
    if kind == "csv":
        table = open_table(path, opts)
        return load_eval(kind, path, image_size, opts, f"from {path} (--eval-data)", table=table,
                         rows=list(range(len(table.rows))))
    return load_eval(kind, path, image_size, opts, f"from {path} (--eval-data)")
