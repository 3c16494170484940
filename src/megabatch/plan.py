"""`megabatch plan`: per-rank peak memory and bytes sent of one loss step, before renting GPUs.

    megabatch plan --loss siglip --strategy ring --backend triton --world 64 --batch 1048576 --dim 512 \\
        --dtype bfloat16 --gpu-mem 80GiB
    megabatch plan ... --json          # one object: peak_bytes, sent_bytes, total_bytes, fits, status, options

peak_bytes is what the loss's forward + backward allocates on one rank beyond its inputs (the
(b, D) image and (n, D) text features), at its highest; sent_bytes what one rank sends per step
under the ring cost model of strategies/_comm.py (all_gather (W-1)*n_local, all_reduce
2(W-1)/W*n, reduce_scatter (W-1)/W*n, a point-to-point send n bytes), the count `megabatch bench`
reports. With --act-bytes (the towers' activation bytes per sample) and --micro-batch, total_bytes
adds the GradCache step around the loss: the features of the rank's batch and one micro-batch's
activations (parameters and optimizer state are the user's to add).

Where the formulas come from (B images and N texts in all, b = ceil(B/W) and n = ceil(N/W) on the largest
rank -- uneven batches are planned, as the library takes them --, D, e the
feature element size, c the compute element size (4; 8 for float64), T the torch backend's logit
tile (kernels/torch_chunked.py's TILE_ELEMENTS: this module imports every constant of the kernels; a tile
is min(b, max(16, T / cols)) x cols for the cols texts a visit meets, as that module cuts it),
U_x = b*D*c, U_y = n*D*c, E_x = b*D*e, E_y = n*D*e, V_y = N*D*c):
  * bytes sent: the README's communication table and the strategies' docstrings, term by term,
    plus the 8-int64 layout exchange (_comm.LAYOUT_BYTES, 64 to each of W-1 peers) and, with --ids,
    8 bytes per text row wherever a text block travels (ids go with their blocks), and for CLIP the
    positive counts and logit sums (16 bytes per text) with the forward's statistics, the column
    targets (8 more) with the backward's, and an all-reduce of two float64 (rows and columns with a
    positive);
  * memory, torch backend, read off the code and checked on CPU against the allocator's own events
    (benchmarks/plan_check.py, float32, D = 256, B = 4096 and 8192, W = 1..4):
      local         rows finished chunk by chunk into dx: the kernels' compute-dtype copy of the
                    texts (16-bit only, U_y), gy, dx and 2 tiles = [U_y] + U_y + E_x + 2T; CLIP
                    adds 16 bytes of statistics per row; SigLIP's backward holds the saved dx, dy
                    and their scaled copies, 2(E_x + E_y), which is its peak in float32
      ring          per visit: the block held and (W >= 3) the next one arriving (E_y each), the
                    accumulator sent and the one received (U_y each), gx and this visit's gx and
                    gy parts (2 U_x + U_y), 2 tiles; CLIP adds 8 bytes per row per lse travelling
      gather        one visit of all N texts (the row side finished chunk by chunk, as local): the
                    gathered texts (N*D*e, kept from forward to backward), the (N, D) compute-dtype
                    text-gradient accumulator, dx and 2 tiles (16-bit: plus the kernels' compute
                    copy of the gathered texts, N*D*c)
    bfloat16 on CPU (W = 1, 2, 4, B = 4096) is within 3%, but 16-bit rows stay marked predicted (a GPU
    has other kernels and allocator);
  * triton backend: benchmarks/memory_accounting.py's measured slopes (CLIP backward and SigLIP
    forward 8 bytes per b*D for 16-bit features: dx 2 + fp32 gy 4 + dy 2) plus the super-block
    scratch (TritonConfig.default's, min(b, 8192) x min(cols, 8192) in the input dtype, as the kernels
    allocate it); distributed triton rows follow the torch
    structure without the per-visit gx part (the kernels accumulate in place): predicted;
  * dense backend: the (b, n) logits and their gradient, 4 (CLIP) or 5 (SigLIP) logit-sized
    buffers (the README's measured dense rows): predicted.
Every row that a GPU has not measured is marked "predicted"; float32 torch-backend rows on CPU are
"checked on CPU" (within 10% at B >= 4096, D = 256; within 1 MiB at b from 64 to 1,024, W up to 8).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from . import kernels, strategies
from .kernels.torch_chunked import CPU_TILE_ELEMENTS, GPU_TILE_ELEMENTS
from .kernels.triton_config import TritonConfig
from .losses import LOSSES
from .strategies._comm import LAYOUT_BYTES

# The concrete names of the library's lists ("auto" is resolved first, as the losses resolve it)
STRATEGIES = tuple(s for s in strategies.STRATEGIES if s != "auto")
BACKENDS = tuple(b for b in kernels.BACKENDS if b != "auto")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
DEVICES = ("cuda", "cpu")
LSE_BYTES = 8  # the torch backend's float64 log-sum-exps
ID_BYTES = 8


@dataclass
class Plan:
    """One configuration's per-rank numbers (bytes)."""

    loss: str
    strategy: str
    backend: str
    world: int
    batch: int
    texts: int
    dim: int
    dtype: str
    device: str
    ids: bool
    peak_bytes: int
    sent_bytes: int
    inputs_bytes: int
    activation_bytes: int
    total_bytes: int
    status: str
    terms: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """One configuration as one rank sees it, in the module docstring's names: b, n the rank's images and
    texts, N the global texts; e and c the feature and compute element sizes (bytes)."""

    loss: str
    strategy: str
    backend: str
    world: int
    b: int  # the largest rank's images (uneven batches: ceil(B / W))
    n: int  # the largest rank's texts (ceil(N / W))
    N: int
    dim: int
    dtype: str
    device: str
    ids: bool
    nmin: int = -1  # the smallest rank's texts (floor(N / W)); -1: n (an even split)

    @property
    def n_low(self) -> int:
        return self.n if self.nmin < 0 else self.nmin

    @property
    def cols(self) -> int:
        """Texts one visit meets: the whole gathered batch (gather) or one block."""
        return self.N if self.strategy == "gather" else self.n

    @property
    def e(self) -> int:
        return DTYPES[self.dtype]

    @property
    def c(self) -> int:
        return 8 if self.dtype == "float64" else 4

    @property
    def ux(self) -> int:
        return self.b * self.dim * self.c

    @property
    def uy(self) -> int:
        return self.n * self.dim * self.c

    @property
    def ex(self) -> int:
        return self.b * self.dim * self.e

    @property
    def ey(self) -> int:
        return self.n * self.dim * self.e

    @property
    def vy(self) -> int:
        return self.N * self.dim * self.c

    @property
    def idb(self) -> int:
        """Bytes of ids per row that travel with the features."""
        return ID_BYTES if self.ids else 0

    @property
    def tiles(self) -> int:
        """The torch backend's two logit tiles (its largest temporaries) as torch_chunked.py cuts them:
        max(16, T // cols) rows (at most b) of `cols` columns; 0 for the other backends."""
        if self.backend != "torch":
            return 0
        t = CPU_TILE_ELEMENTS if self.device == "cpu" else GPU_TILE_ELEMENTS
        return 2 * min(self.b, max(16, t // max(self.cols, 1))) * self.cols * self.c

    @property
    def scratch(self) -> int:
        """The triton backend's super-block scratch (input dtype) as triton_kernels.py allocates it:
        min(b, super_rows) x min(cols, super_cols)."""
        cfg = TritonConfig.default(getattr(torch, self.dtype))
        return min(self.b, cfg.super_rows) * min(self.cols, cfg.super_cols) * self.e


def _memory(s: Shape) -> dict[str, int]:
    """Named terms of the peak (bytes); their sum is peak_bytes."""
    b, n, N, dim, e, c = s.b, s.n, s.N, s.dim, s.e, s.c
    ux, uy, ex, ey, vy, idb, tiles = s.ux, s.uy, s.ex, s.ey, s.vy, s.idb, s.tiles
    conv = uy if e != c else 0  # the kernels' compute-dtype copy of a 16-bit text block
    if s.backend == "dense":
        return {"logit-sized buffers": (4 if s.loss == "clip" else 5) * b * (N if s.strategy == "gather" else n) * c,
                "gradients": ex + ey}
    if s.backend == "triton":
        cfg = TritonConfig.default(getattr(torch, s.dtype))
        scratch = s.scratch
        if s.strategy == "local":
            return {"dx + fp32 gy + dy": ex + uy + ey, "super-block scratch": scratch, "statistics": 16 * (b + n)}
        if s.strategy == "ring":
            blocks = (2 if s.world >= 3 else 1) * (ey + n * idb)
            return {"text blocks in flight": blocks, "accumulators sent and received": 2 * uy,
                    "gx + gy part": ux + uy, "super-block scratch": scratch, "statistics": 48 * max(b, n)}
        # one visit: the row side is finished one row of super-blocks at a time (a (super_rows, D) fp32 buffer)
        return {"gathered texts": N * dim * e + N * idb, "fp32 text-gradient accumulator": vy,
                "dx + one row of super-blocks' fp32 gx": ex + min(b, cfg.super_rows) * dim * 4,
                "super-block scratch": scratch}
    if s.strategy == "local":  # the row side is finished chunk by chunk into dx (a row sink): no (b, D) gx
        during = conv + uy + ex + tiles  # the text block's compute copy, gy, dx, 2 tiles
        if s.loss == "clip":
            after = uy + ex + (ey if e != c else 0)  # gy, dx and (16-bit) dy
            return {"conv copy + gy + dx + tiles" if during >= after else "gy + dx + dy": max(during, after),
                    "statistics": 16 * (b + n)}
        backward = 2 * (ex + ey)  # the saved dx, dy and their scaled copies
        return {"forward: conv copy + gy + dx + tiles" if during >= backward else "saved and scaled dx, dy":
                max(during, backward)}
    if s.strategy == "ring":
        blocks = (2 if s.world >= 3 else 1) * (ey + n * idb)
        terms = {"text blocks in flight": blocks, "accumulators sent and received": 2 * uy,
                 "gx, its part and the gy part": 2 * ux + uy + conv, "tiles": tiles}
        if s.loss == "clip":
            terms["statistics"] = LSE_BYTES * (2 * b + 2 * n + (2 if s.world >= 3 else 1) * n)
        return terms
    terms = {"gathered texts": N * dim * e + N * idb, "(N, D) text-gradient accumulator": vy, "dx": ex,
             "the kernels' compute copy of the gathered texts": N * dim * c if e != c else 0, "tiles": tiles}
    if s.loss == "clip":
        terms["statistics"] = 2 * LSE_BYTES * N + LSE_BYTES * b
    return terms


def _ar(w: int, nbytes: int) -> int:
    """What one all-reduce of `nbytes` counts (_comm floors each call's count)."""
    return int(2 * (w - 1) / w * nbytes)


def _sent(s: Shape) -> int:
    """Bytes the busiest rank sends per step (forward + backward) under _comm's ring cost model, call by
    call as _comm counts them. Uneven splits: a ring rank forwards every block but its successor's (the
    smallest, n_low, at worst) and every accumulator; gather pads blocks to the largest (n)."""
    if s.strategy == "local" or s.world == 1:
        return 0
    w, n, N, c, d = s.world, s.n, s.N, s.c, s.dim
    row = d * s.e + s.idb  # a text row and its id
    sent = (w - 1) * LAYOUT_BYTES
    clip_ids = s.ids and s.loss == "clip"
    pos_sums = 16 if clip_ids else 0  # with ids: each column's positive count and logit sum
    target = 8 if clip_ids else 0  # with ids: each column's positive target, in the backward
    if clip_ids:
        sent += _ar(w, 16)  # all-reduce of (rows, columns) with a positive
    if s.strategy == "ring":
        passed = N - s.n_low  # the text rows this rank forwards (W - 1 blocks)
        if s.loss == "clip":
            sent += passed * row + N * (LSE_BYTES + pos_sums)  # forward: blocks, column statistics
            sent += passed * (row + LSE_BYTES + target) + N * d * c  # backward: blocks + stats, grads
        else:
            sent += passed * row + N * d * c
        return sent
    sent += (w - 1) * n * row  # all_gather of the texts (and their ids), padded to n, kept for the backward

    def reduce(width: int) -> int:  # (N, width) sums to their owners: NCCL reduce-scatters (padded), gloo all-reduces
        return (w - 1) * n * width if s.device == "cuda" else _ar(w, N * width)

    sent += reduce(d * c)
    if s.loss == "clip":
        sent += 2 * _ar(w, N * LSE_BYTES)  # the column lse: max and sum all-reduces
        sent += reduce(pos_sums) if clip_ids else 0  # with ids: the positive counts and sums to their owners
        sent += (w - 1) * n * (LSE_BYTES + target)  # backward: the column statistics gathered again
    return sent


def plan(loss: str, strategy: str, backend: str, world: int, batch: int, dim: int, dtype: str, *,
         texts: Optional[int] = None, device: str = "cuda", ids: bool = False, act_bytes: int = 0,
         micro_batch: int = 0) -> Plan:
    """The per-rank numbers of one configuration (see the module docstring). ValueError on bad input."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    texts = batch if texts is None else texts
    for name, value in (("world", world), ("batch", batch), ("texts", texts), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("act_bytes", act_bytes), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if strategy == "local" and world != 1:
        raise ValueError(f"strategy local is one process: world must be 1, got {world}")
    if strategy != "local" and world == 1:
        raise ValueError(f"strategy {strategy} spreads the batch over ranks: world must be >= 2 (one process: local)")
    if backend == "triton" and device == "cpu":
        raise ValueError("backend triton runs on cuda (on CPU only through Triton's interpreter): use --device cuda")
    # uneven batches: the largest rank (ceil) is planned; ranks beyond the batch hold nothing
    shape = Shape(loss, strategy, backend, world, -(-batch // world), -(-texts // world), texts, dim, dtype, device,
                  ids, texts // world)
    terms = _memory(shape)
    peak = int(sum(terms.values()))
    sent = _sent(shape)
    inputs = shape.ex + shape.ey + (shape.b + shape.n) * shape.idb
    activations = act_bytes * micro_batch
    checked = device == "cpu" and backend == "torch" and dtype == "float32" and not ids and texts == batch
    status = "checked on CPU" if checked else "predicted"
    return Plan(loss, strategy, backend, world, batch, texts, dim, dtype, device, ids, peak, sent, inputs,
                activations, peak + inputs + activations, status, terms)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '80000MiB' -> bytes. The unit is required: a bare 80 is read as nothing (80 bytes
    is never what was meant), ValueError showing the accepted form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size with its unit, such as 80GiB, 80GB or 80000MiB "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _parser() -> argparse.ArgumentParser:
    from .cli import CommandParser

    p = CommandParser(prog="megabatch plan", description=__doc__.split("\n\n")[0],
                      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=LOSSES, default="clip", help="the loss planned (default clip)")
    p.add_argument("--strategy", choices=strategies.STRATEGIES, default="auto",
                   help="auto: ring when --world > 1, local otherwise (as the losses pick)")
    p.add_argument("--backend", choices=kernels.BACKENDS, default="auto",
                   help="auto: triton on cuda, torch on cpu (as the losses pick)")
    p.add_argument("--world", type=int, default=1, help="ranks W")
    p.add_argument("--batch", type=int, required=True, help="GLOBAL image count B (all ranks)")
    p.add_argument("--texts", type=int, help="global text count N (default: --batch; SigLIP may have more)")
    p.add_argument("--dim", type=int, required=True, help="feature dimension D")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="feature dtype")
    p.add_argument("--device", choices=DEVICES, default="cuda", help="where the loss runs (default cuda)")
    p.add_argument("--ids", action="store_true", help="image/text ids (int64) travel with the features")
    p.add_argument("--act-bytes", type=int, default=0, help="the towers' activation bytes per sample (GradCache)")
    p.add_argument("--micro-batch", type=int, default=0, help="GradCache micro-batch per rank")
    p.add_argument("--gpu-mem", help="memory per rank, e.g. 80GiB: also list which strategies/backends fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    strategy = strategies.resolve_strategy(a.strategy, a.world)
    backend = a.backend if a.backend != "auto" else kernels.auto_backend(a.device)
    common = dict(texts=a.texts, device=a.device, ids=a.ids, act_bytes=a.act_bytes, micro_batch=a.micro_batch)
    try:
        try:
            gpu_mem = parse_bytes(a.gpu_mem) if a.gpu_mem is not None else None
        except ValueError as e:
            raise ValueError(f"--gpu-mem: {e}") from None
        chosen = plan(a.loss, strategy, backend, a.world, a.batch, a.dim, a.dtype, **common)
        options = []
        for st in (("local",) if a.world == 1 else ("ring", "gather")):
            for be in BACKENDS:
                if be == "triton" and a.device == "cpu":
                    continue
                options.append(plan(a.loss, st, be, a.world, a.batch, a.dim, a.dtype, **common))
    except ValueError as e:
        parser.error(str(e))
    fits = None if gpu_mem is None else chosen.total_bytes <= gpu_mem
    if a.json:
        keys = ("strategy", "backend", "peak_bytes", "sent_bytes", "total_bytes", "status")
        rows = [{**{k: getattr(o, k) for k in keys}, "fits": None if gpu_mem is None else o.total_bytes <= gpu_mem}
                for o in options]
        out: dict[str, Any] = {**asdict(chosen), "gpu_mem_bytes": gpu_mem, "fits": fits, "options": rows}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{a.loss}, {a.world} rank(s), B = {a.batch} images, N = {chosen.texts} texts (b = {-(-a.batch // a.world)}, "
          f"n = {-(-chosen.texts // a.world)} on the largest rank), D = {a.dim}, {a.dtype} on {a.device}{', ids' if a.ids else ''}")
    print(f"{'strategy':9}{'backend':8}{'peak':>12}{'sent/step':>12}{'total':>12}  {'fits' if gpu_mem else ''}")
    for o in options:
        mark = "" if gpu_mem is None else ("yes" if o.total_bytes <= gpu_mem else "no")
        star = " <-" if (o.strategy, o.backend) == (chosen.strategy, chosen.backend) else ""
        print(f"{o.strategy:9}{o.backend:8}{_fmt(o.peak_bytes):>12}{_fmt(o.sent_bytes):>12}{_fmt(o.total_bytes):>12}"
              f"  {mark:4}{o.status}{star}")
    print("peak: the loss's forward+backward beyond its inputs; total adds the features"
          + (" and one micro-batch's activations" if a.act_bytes and a.micro_batch else "")
          + "; sent: bytes per rank per step (ring cost model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
