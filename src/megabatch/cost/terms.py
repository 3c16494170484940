"""The cost model's terms (src/megabatch/plan.py's docstring says where each comes from): the shape one rank
sees, the named terms of its peak memory, and the bytes it sends, call by call as strategies/_comm.py counts
them. The time of a step is cost/time.py's. Pure arithmetic on sizes: no torch.distributed, no tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.torch_chunked import CPU_TILE_ELEMENTS, GPU_TILE_ELEMENTS
from ..kernels.triton_config import TritonConfig

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
LSE_BYTES = 8  # the torch backend's float64 log-sum-exps
ID_BYTES = 8
# The layout exchange's row (strategies/_comm.py): one int64 per column, in this order. Defined here, where
# the model counts its bytes; _comm fills it. budget: the rank's memory budget for "auto" (-1: no limit);
# hardware: its device's profile (cost.PROFILES' index), so every rank plans "auto" with the same rates.
LAYOUT_COLUMNS = ("images", "texts", "dim", "dtype", "grads", "backend", "ids", "strategy", "loss", "directions",
                  "ranks_per_node", "compiled", "budget", "hardware")
LAYOUT_BYTES = 8 * len(LAYOUT_COLUMNS)  # what the exchange sends each peer


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
    node: int = 1  # ranks per node R: hierarchical's intra-node group (the other strategies ignore it)

    @property
    def n_low(self) -> int:
        return self.n if self.nmin < 0 else self.nmin

    @property
    def cols(self) -> int:
        """Texts one visit meets: the whole gathered batch (gather), a node's R slices (hierarchical) or one
        block."""
        if self.strategy == "hierarchical":
            return self.node * self.n
        return self.N if self.strategy == "gather" else self.n

    @property
    def nodes(self) -> int:
        """M = W / R, hierarchical's steps per pass."""
        return max(self.world // self.node, 1)

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


def memory_terms(s: Shape) -> dict[str, int]:
    """Named terms of the peak (bytes); their sum is peak_bytes."""
    b, n, N, dim, e, c = s.b, s.n, s.N, s.dim, s.e, s.c
    ux, uy, ex, ey, vy, idb, tiles = s.ux, s.uy, s.ex, s.ey, s.vy, s.idb, s.tiles
    conv = uy if e != c else 0  # the kernels' compute-dtype copy of a 16-bit text block
    if s.backend == "dense":
        return {"logit-sized buffers": (4 if s.loss == "clip" else 5) * b * s.cols * c,
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
        if s.strategy == "hierarchical":
            return {**_node_block(s), "accumulators sent and received": 2 * uy, "gx": ux,
                    "super-block scratch": scratch, "statistics": 48 * max(b, s.cols)}
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
    if s.strategy == "hierarchical":
        terms = {**_node_block(s), "accumulators sent and received": 2 * uy,
                 "gx, its part and the node block's compute copy": 2 * ux + (s.cols * dim * c if e != c else 0),
                 "tiles": tiles}
        if s.loss == "clip":
            terms["statistics"] = LSE_BYTES * (2 * b + 2 * s.cols + n)
        return terms
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


def _node_block(s: Shape) -> dict[str, int]:
    """hierarchical (predicted: the strategy is newer than plan_check.py): the node block of R slices gathered
    (and, M >= 2, the next slice arriving over InfiniBand) and its fp32 gradient contributions before their
    reduce-scatter, O(R*n*D) a rank."""
    slice_ = s.ey + s.n * s.idb
    return {"node block gathered + next slice": (s.node + (s.nodes >= 2)) * slice_,
            "node block's fp32 gradient contributions": s.node * s.uy}


def passes(s: Shape) -> list[tuple[int, int, int, int, int]]:
    """The passes of a travelling block (ring, hierarchical): per pass (GEMM passes of its visit, block bytes,
    block tensors, accumulator bytes, accumulator tensors), for the largest rank's block (n rows). CLIP's
    statistics pass (texts [+ ids]; lse [+ positive sums]) then its gradients (texts [+ ids], the column
    statistics [+ targets]; text gradients); SigLIP one pass (texts [+ ids]; text gradients)."""
    n, ids = s.n, int(s.ids)
    row, e16 = s.dim * s.e + s.idb, 16 if s.ids else 0
    if s.loss == "clip":
        return [(1, n * row, 1 + ids, n * (LSE_BYTES + e16), 1 + ids),
                (3, n * (row + LSE_BYTES + e16 // 2), 2 + 2 * ids, n * s.dim * s.c, 1)]
    return [(3, n * row, 1 + ids, n * s.dim * s.c, 1)]


def node_reduction(s: Shape, k: int) -> tuple[int, int]:
    """(bytes, collective calls) of one hierarchical step's intra-node reduction in pass k (R > 1): each
    accumulator of the node block's R*n rows summed back to its slice holders. "sum" (text gradients, CLIP's
    positive sums) is one call: on CUDA (NCCL) a reduce-scatter, (R-1)*n*width; on CPU (gloo) an all-reduce of
    the whole block and a slice, 2(R-1)/R * R*n*width, twice as much. CLIP's column log-sum-exp (pass 0) is
    two all-reduces (max, then the sum of exp) of R*n*8 on either backend (strategies/hierarchical.py)."""
    r, n = s.node, s.n

    def summed(width: int) -> int:
        return (r - 1) * n * width if s.device == "cuda" else _ar(r, r * n * width)

    if s.loss == "clip" and k == 0:
        return 2 * _ar(r, r * n * LSE_BYTES) + (summed(16) if s.ids else 0), 2 + s.ids
    return summed(s.dim * s.c), 1


def hierarchical_passes(s: Shape) -> list[tuple[int, int]]:
    """(bytes, messages) one hierarchical rank sends in each pass of `passes(s)` (equal slices of n texts; the
    layout exchange and CLIP's ids all-reduce not included): M - 1 p2p hops of the slice and M of its
    accumulators (the last one home; none when M = 1), and at each of the M steps (R > 1) an all-gather of the
    slice's tensors, (R-1) slices each, and the node reduction of its accumulators."""
    m, r = s.nodes, s.node
    out = []
    for k, (_, blk, kb, acc, ka) in enumerate(passes(s)):
        nbytes, msgs = (m - 1) * blk, (m - 1) * kb
        if m > 1:
            nbytes, msgs = nbytes + m * acc, msgs + m * ka
        if r > 1:
            red, calls = node_reduction(s, k)
            nbytes, msgs = nbytes + m * ((r - 1) * blk + red), msgs + m * (kb + calls)
        out.append((nbytes, msgs))
    return out


def _ar(w: int, nbytes: int) -> int:
    """What one all-reduce of `nbytes` counts (_comm floors each call's count)."""
    return int(2 * (w - 1) / w * nbytes)


def sent_bytes(s: Shape) -> int:
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
    if s.strategy == "hierarchical":
        return sent + sum(nbytes for nbytes, _ in hierarchical_passes(s))
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


def shape_of(loss: str, strategy: str, backend: str, world: int, batch: int, texts: int, dim: int, dtype: str,
             device: str, ids: bool, ranks_per_node: int = 1) -> Shape:
    """Uneven batches: the largest rank (ceil) is planned; ranks beyond the batch hold nothing. ranks_per_node:
    hierarchical's R (world must be a multiple of it)."""
    return Shape(loss, strategy, backend, world, -(-batch // world), -(-texts // world), texts, dim, dtype, device,
                 ids, texts // world, ranks_per_node)
