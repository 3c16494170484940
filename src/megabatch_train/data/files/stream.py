"""Training streams and evaluation sets over users' files: CSV/TSV tables and webdataset shards.

Wraps the readers of tables.py and shards.py (which split rows/shards by rank, then by worker,
shuffle per epoch with the seed, loop forever, and skip and count bad items). The pieces it is
built from (options, decoding, the held-out rows of a table, chunks of pairs) are in loading.py.

Loading. Each rank reads its share through a torch DataLoader with `workers` processes (0: in the
training process), persistent, prefetching, with pinned memory on CUDA. A worker decodes whole
chunks of `CHUNK` pairs (centre crop, resize, uint8; JPEGs decoded at a reduced DCT scale when
that is still at least the model's size); the training process takes chunks in the DataLoader's
fixed round-robin order over workers, moves them to the device and normalises them there with
CLIP's mean and std. The pairs of a rank are therefore a function of (seed, workers, world size).
For a pretrained Hugging Face model (`FileOptions.pixels`) the workers apply its image processor's
own resize and centre crop to the whole decoded image (no reduced JPEG decoding: the processor sees
what it would see) and the batches come out in [0, 1]; the model normalises with the processor's
mean and std.

Bad items. Workers read ahead (PREFETCH chunks each, many epochs of a small table) and meet a bad
row again every epoch; they only count it and pass its description along in the chunk. The
training process says each distinct bad item once, when it uses the first pair after it (in the
order of the pairs, not of the workers), counts how often it was skipped, and `skip_summary()`
puts the counts in one line for the end of the run.

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
import warnings
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ...evaluation.report import percent
from ...run.preempt import shield_loader_worker
from ..types import DataError, EvalData
from .loading import (EVAL_CAP, SPLIT_SEED, Chunks, FileOptions, collate, normalize, open_table, raise_error, reader,
                      split_rows)
from .pairs import REASONS
from .tables import CsvPairs

CHUNK = 128  # pairs a worker decodes per DataLoader item
PREFETCH = 4  # chunks each worker keeps ready
WARN_FIRST = 5  # distinct bad items the training process warns about one by one; the rest are counted
TOKENIZER_SAMPLE = 100_000  # training captions the BPE learns from (and the context is fitted to)


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
        self.pixels = opts.pixels
        self.image_size, self.device = image_size, torch.device(device)
        split = opts.eval_split if held_out else 0.0
        self.eval_rows: list[int] = []
        try:
            if kind == "csv":
                self.table = open_table(path, opts)
                train_rows, self.eval_rows = split_rows(len(self.table.rows), split, world, path)
                self.pairs = reader(kind, path, image_size, opts, table=self.table, rows=train_rows, rank=rank,
                                     world_size=world, shuffle=True, seed=seed, repeat=True)
            else:
                if split >= 1:
                    raise DataError(f"--eval-split {split:g}: shards hold out a fraction of their samples (by key); "
                                    "give a fraction < 1, 0, or --eval-data")
                self.pairs = reader(kind, path, image_size, opts, held_out=split, split="train", rank=rank,
                                     world_size=world, shuffle=True, seed=seed, repeat=True)
        except DataError:
            raise
        except ValueError as e:  # e.g. fewer rows or shards than ranks
            raise DataError(f"--data {kind}:{path}: {e}") from None
        self.held_out = split
        self.rank, self.world = rank, world
        self.pairs.events = []  # the workers pass bad items on; this process says them (_report)
        self._bad_items: dict[str, list[Any]] = {}  # where -> [reason, times skipped], in the order met
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

    def skip_summary(self) -> Optional[str]:
        """One line for the end of the run: the distinct bad items met, how often they were skipped
        (each epoch meets them again) and the first few with their counts; None when there were none."""
        if not self._bad_items:
            return None
        unit = "row(s)" if self.kind == "csv" else "item(s)"
        total = sum(times for _, times in self._bad_items.values())
        shown = [f"{where}: {reason}, {_times(times)}" for where, (reason, times) in self._bad_items.items()]
        more = f"; {len(shown) - WARN_FIRST} more" if len(shown) > WARN_FIRST else ""
        before = int(self._carried.sum())
        resumed = f" (and {before} before the resume)" if before else ""
        return (f"{self._who()}skipped {len(shown)} bad {unit} {_times(total)} in all{resumed}: "
                + "; ".join(shown[:WARN_FIRST]) + more)

    def _who(self) -> str:
        return f"{self.pairs.name}: " + (f"rank {self.rank}: " if self.world > 1 else "")

    def _report(self, reason: str, where: str, why: str) -> None:
        """A bad item skipped before a pair now used: said the first time (the first few), counted."""
        seen = self._bad_items.get(where)
        if seen is not None:
            seen[1] += 1
            return
        self._bad_items[where] = [reason, 1]
        if len(self._bad_items) <= WARN_FIRST:
            more = " (further bad items are only counted)" if len(self._bad_items) == WARN_FIRST else ""
            warnings.warn(f"{self._who()}skipping {where}: {reason} ({why}); it is skipped in every epoch, counted "
                          f"at the end of the run{more}")

    def distinct_pairs(self, limit: int) -> int:
        """The training pairs of all ranks that differ, counted up to `limit`: distinct (image, caption)
        rows of a table (bad images are not looked at); samples with a caption of shards, read in
        order until `limit`."""
        if self.kind != "csv":
            found = len(self.pairs.captions(limit))
            if not found:
                raise self._no_caption()
            return found
        t, seen = self.table, set()
        for r in self.pairs._order:
            row = t.rows[r]
            if max(t.image, t.caption) < len(row) and row[t.caption].strip():
                seen.add((row[t.image], row[t.caption].strip()))
                if len(seen) >= limit:
                    break
        if not seen:
            raise self._no_caption()
        return len(seen)

    def training_captions(self, limit: int = TOKENIZER_SAMPLE) -> list[str]:
        """Captions the tokenizer learns from: training pairs only, the same on every rank."""
        if self.kind == "csv":
            rows = self.pairs._order
            if len(rows) > limit:
                rows = sorted(np.random.default_rng(SPLIT_SEED + 1).choice(rows, limit, replace=False).tolist())
            out = self.table.captions(rows)
        else:
            out = self.pairs.captions(limit)
        if not out:
            raise self._no_caption()
        return out

    def _no_caption(self) -> DataError:
        if self.kind == "csv":
            what = (f"none of its {len(self.pairs._order):,} training rows has a caption (--csv-caption-key "
                    f"{self.opts.caption_key!r})")
        else:
            exts = "/".join(f".{e}" for e in self.pairs.caption_exts)
            what = (f"no training sample of its {len(self.pairs.shards)} shard(s) has a caption (a {exts} member)"
                    + (f"; {self.pairs.unreadable}: are they webdataset tar files?" if self.pairs.unreadable else ""))
        return DataError(f"--data {self.name}: {what}")

    # -- the stream ------------------------------------------------------------------------------
    def _start(self) -> Iterator[dict[str, Any]]:
        first = [CHUNK] * self.workers
        if self._left:
            first[self._next] = self._left
        chunks = Chunks(self.pairs, CHUNK, [list(c) for c in self._cursors], first, self._next)
        if self.in_process:
            return iter(chunks)
        self._loader = DataLoader(chunks, batch_size=None, num_workers=self.workers, persistent_workers=True,
                                  prefetch_factor=PREFETCH, pin_memory=self.device.type == "cuda",
                                  worker_init_fn=shield_loader_worker)  # the trainer decides when to stop
        return iter(self._loader)

    def _take(self, n: int) -> list[dict[str, Any]]:
        """The next n pairs as slices of chunks."""
        if self._it is None:
            self.pairs.events.clear()  # (in-process reading) from before a restart of the stream
            self._it = self._start()
        pieces = []
        while n:
            if self._buf is None:
                self._buf, self._offset = raise_error(next(self._it)), 0
            buf, lo = self._buf, self._offset
            hi = min(len(buf["captions"]), lo + n)
            pieces.append({k: (v[lo:hi] if k in ("images", "captions", "ids") and v is not None else v)
                           for k, v in buf.items()})
            for at, reason, where, why in buf["skips"]:
                if lo <= at < hi:
                    self._report(reason, where, why)
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
        return normalize(images, self.opts.pixels), captions, ids

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
            share = f"{percent(len(rows) / n)} of its {n:,} rows"  # what was held out, not the flag's fraction
            if self.held_out >= 1:
                share += f", --eval-split {self.held_out:g}"
            elif round(self.held_out * n) > EVAL_CAP:
                share += f", --eval-split {self.held_out:g} capped at {EVAL_CAP:,}"
            how = f"held out of {self.path} ({share}), never trained on"
            return load_eval(self.kind, self.path, self.image_size, self.opts, how, table=self.table, rows=rows)
        how = (f"held out of {self.path}: the samples whose key hashes below {self.held_out:g} (never trained on), "
               f"the first {EVAL_CAP:,} at most in shard order")
        return load_eval(self.kind, self.path, self.image_size, self.opts, how, cap=EVAL_CAP, held_out=self.held_out,
                         split="eval")


def _times(n: int) -> str:
    return f"{n:,} time{'' if n == 1 else 's'}"


def load_eval(kind: str, path: str, image_size: int, opts: FileOptions, how: str, cap: int = 0,
              **kw: Any) -> EvalData:
    """The pairs of an evaluation reader, in order (the first --eval-size only, when set; shards
    stop at `cap`): retrieval only, no classes. The description says what was held out and any cut."""
    size, cut = opts.eval_size, ""
    if kind == "csv":
        rows = kw.pop("rows")
        if size and len(rows) > size:
            rows, cut = rows[:size], f"; cut to the first {size:,} of {len(rows):,} by --eval-size"
        pairs = reader(kind, path, image_size, opts, rows=rows, **kw)
        chunks = _read_all_rows(pairs, opts.workers)
    else:
        limit = min(x for x in (size, cap, 2**62) if x)
        pairs = reader(kind, path, image_size, opts, **kw)
        items = [(it, (0, 0, 0)) for it in itertools.islice(pairs, limit)]
        chunks = [collate(0, items)] if items else []
        if len(items) == limit and size == limit:
            cut = f"; cut to the first {size:,} by --eval-size"
    if not chunks:
        raise DataError(f"evaluation data {kind}:{path} holds no usable image-caption pair (skipped: {pairs.counts})")
    images = normalize(torch.cat([c["images"] for c in chunks]), opts.pixels)
    captions = [t for c in chunks for t in c["captions"]]
    ids = torch.cat([c["ids"] for c in chunks]).numpy() if chunks[0]["ids"] is not None else None
    about = f"{len(captions):,} pair{'' if len(captions) == 1 else 's'} {how}{cut}"
    if pairs.skipped:
        about += f"; {pairs.skipped} bad pair(s) skipped"
    return EvalData(images, captions, [], about, ids=ids)


def _read_all_rows(pairs: CsvPairs, workers: int) -> list[dict[str, Any]]:
    """Every row of a table reader through a DataLoader, back in row order."""
    n = max(1, min(workers, pairs.units()))
    chunks = Chunks(pairs, CHUNK, [[0, 0, 0]] * n, [CHUNK] * n, 0)
    got = [raise_error(c) for c in (chunks if workers == 0 else DataLoader(chunks, batch_size=None, num_workers=n))]
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
