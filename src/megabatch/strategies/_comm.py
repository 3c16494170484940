"""Communication shared by the `gather`, `ring` and `hierarchical` strategies.

`exchange_layout` is the first thing every distributed loss call does: ONE all_gather of one int64
per `_COLUMNS` entry per rank: image count b, text count n, feature dim D, dtype code, requires-grad
flags, backend, whether ids are given, the strategy, the loss (clip or siglip), CLIP's directions,
hierarchical's ranks_per_node, whether the call takes the compiled road (a custom op), and, for
"auto", the rank's memory budget and hardware profile (cost.LAYOUT_COLUMNS). That is everything that
decides which collectives a call runs and their sizes ("auto" is decided from this table, by
strategies/auto.py, identically on every rank), so every rank checks the same
table and ranks that disagree on any of it all raise the same ValueError before any other collective
(never a hang, never a gloo abort), and every rank knows every local batch size: uneven and
rectangular sizes work exactly. Reading that table on the host (`.tolist()`) is the one host sync of
a distributed call; it is unavoidable, since receive buffers must be sized before they are posted.
Collectives use the features' device: CPU tensors need gloo, CUDA tensors NCCL. A rank that never
enters the exchange (it never calls the loss, or calls it with strategy="local") is not seen: the
others wait for it until the process group's timeout, as with any collective.

The collective wrappers below are the only places the strategies talk to torch.distributed, so
`count_bytes()` can tally what this rank sends under the usual bandwidth-optimal (ring) cost
model: all_gather (W-1)*n_local, all_reduce 2(W-1)/W*n, reduce_scatter (W-1)/W*n, send n bytes.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..cost.terms import LAYOUT_BYTES, LAYOUT_COLUMNS
from ..kernels.base import BlockKernels

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_GRAD_NAMES = ("image_features", "text_features", "logit_scale", "logit_bias")
_STRATEGY_CODES = ("gather", "ring", "hierarchical", "auto")  # the names a distributed call passes, by code
_LOSS_CODES = ("clip", "siglip")  # the loss families, by code
_COLUMNS = LAYOUT_COLUMNS  # the layout exchange's row (one int64 each); LAYOUT_BYTES: what it sends each peer
_INVALID = -1  # a row of this value (report_invalid): that rank's arguments failed validation

# [bytes, messages] sent by this rank while a `count_bytes()` block is open (None: not counting).
_sent: Optional[list[int]] = None

# torch >= 2.13 renames the single-tensor collectives; keep the older names working (torch >= 2.4).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Layout:
    """Who holds what in a process group, agreed by every rank (see `exchange_layout`).
    One process (the local strategy) is a group of one with group=None."""

    group: Optional["dist.ProcessGroup"]
    rank: int  # this process's rank inside `group`
    sizes: tuple[int, ...]  # images (rows) of every group rank
    tsizes: tuple[int, ...]  # texts (columns) of every group rank
    y_grad: bool  # text features need gradients (on every rank, checked)
    ids: bool = False  # positives given by ids (on every rank, checked)
    ranks_per_node: int = 0  # hierarchical's R (on every rank, checked); 0 for the other strategies
    strategy: str = ""  # the concrete strategy (what "auto" chose); "" where the caller named it itself
    choice: object = field(default=None, compare=False)  # "auto"'s cost.Choice (its reason and candidates)

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        """Images in the global batch."""
        return sum(self.sizes)

    @property
    def ttotal(self) -> int:
        """Texts in the global batch."""
        return sum(self.tsizes)

    def offset(self, rank: int) -> int:
        return sum(self.sizes[:rank])

    def toffset(self, rank: int) -> int:
        return sum(self.tsizes[:rank])

    def peer(self, rank: int) -> int:
        """Global rank of group rank `rank` (taken modulo the world): what p2p calls address."""
        return dist.get_global_rank(self.group, rank % self.world)


def exchange_layout(
    x: Tensor, y: Tensor, extras: Sequence[Tensor], kernels: BlockKernels, group: Optional["dist.ProcessGroup"],
    *, strategy: str, loss: str, ids: bool = False, directions: int = 0, needs: Optional[Sequence[bool]] = None,
    ranks_per_node: int = 0, compiled: bool = False, budget: int = -1, hardware: int = 0,
    decide: Optional[Callable[[dict[str, list[int]], str], Any]] = None,
) -> Layout:
    """Agree on everything that decides a call's collectives (see `_COLUMNS`) across `group` (None:
    the world group).

    x: this rank's (b, D) images, y its (n, D) texts; extras: logit_scale (and logit_bias), 0-dim.
    strategy: "gather", "ring", "hierarchical" or "auto" (decided here from the table: Layout.strategy);
    loss: "clip" or "siglip"; directions: CLIP's code; ranks_per_node: hierarchical's R (0 for the others;
    for "auto" the node size the rank knows, 0 if none); compiled: whether the call is a custom op;
    budget, hardware: "auto"'s memory budget in bytes (-1: no limit) and cost.PROFILES index;
    decide: "auto"'s decision, (checked table, loss) -> a cost.Choice (strategies/auto.py's `decide`).
    needs: which of (x, y, *extras) need gradients (None: grad mode and requires_grad).
    Any disagreement raises the same ValueError on every rank.
    """
    pg = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group `group`")
    if needs is None:
        needs = [torch.is_grad_enabled() and t.requires_grad for t in (x, y, *extras)]
    row = dict(images=x.shape[0], texts=y.shape[0], dim=x.shape[1], dtype=_DTYPE_CODES[x.dtype],
               grads=sum(1 << k for k, need in enumerate(needs) if need),
               backend=zlib.crc32(kernels.name.encode()) & 0x7FFFFFFF, ids=int(ids),
               strategy=_STRATEGY_CODES.index(strategy), loss=_LOSS_CODES.index(loss), directions=directions,
               ranks_per_node=ranks_per_node, compiled=int(compiled), budget=budget, hardware=hardware)
    mine = torch.tensor([row[c] for c in _COLUMNS], dtype=torch.int64, device=x.device)
    table_t = mine.new_empty(world * len(_COLUMNS))
    _all_gather_single(table_t, mine, group=pg)
    _count((world - 1) * _nbytes(mine))
    table = table_t.view(world, len(_COLUMNS)).tolist()
    invalid = [r for r, values in enumerate(table) if values[0] == _INVALID]
    if invalid:
        raise ValueError(
            f"group rank(s) {invalid} passed invalid arguments to the loss (their own error says which); "
            "no rank computes this call"
        )
    cols = {c: [values[k] for values in table] for k, c in enumerate(_COLUMNS)}
    _check(cols, kernels)
    lay = Layout(pg, rank, tuple(cols["images"]), tuple(cols["texts"]), bool(row["grads"] & 2), bool(ids),
                 ranks_per_node, strategy)
    if strategy != "auto" or decide is None:
        return lay
    choice = decide(cols, loss)
    return Layout(lay.group, lay.rank, lay.sizes, lay.tsizes, lay.y_grad, lay.ids, choice.ranks_per_node,
                  choice.strategy, choice)


def _check(cols: dict[str, list[int]], kernels: BlockKernels) -> None:
    """Raise the ValueError naming the first disagreement in the exchanged table (the same on every rank)."""
    world = len(cols["images"])
    ranks = f"ranks 0..{world - 1}"
    differ = {c: len(set(v)) > 1 for c, v in cols.items()}
    if differ["strategy"]:
        names = [_STRATEGY_CODES[c] for c in cols["strategy"]]
        raise ValueError(f"every rank of the group must use the same strategy; got {names} on {ranks}")
    if differ["loss"]:
        names = [f"{_LOSS_CODES[c]}_loss" for c in cols["loss"]]
        raise ValueError(f"every rank of the group must call the same loss; got {names} on {ranks}")
    if sum(cols["images"]) == 0 or sum(cols["texts"]) == 0:
        raise ValueError(
            f"the global batch needs at least one image and one text; images per rank {cols['images']}, "
            f"texts per rank {cols['texts']}"
        )
    if differ["dim"]:
        raise ValueError(f"every rank of the group must have the same feature dim D; got D = {cols['dim']} on {ranks}")
    if differ["dtype"]:
        names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
        raise ValueError(
            f"every rank of the group must pass features of the same dtype; got {[names[c] for c in cols['dtype']]} "
            f"on {ranks}"
        )
    if differ["grads"]:
        needing = [[n for k, n in enumerate(_GRAD_NAMES) if g >> k & 1] for g in cols["grads"]]
        raise ValueError(
            "every rank of the group must need gradients for the same inputs (the backward pass "
            f"communicates); requires_grad per rank 0..{world - 1}: {needing}"
        )
    if differ["backend"]:
        raise ValueError(
            f"every rank of the group must use the same backend; this rank uses {kernels.name!r}, others differ"
        )
    if differ["ids"]:
        raise ValueError(
            f"image_ids/text_ids must be given on every rank or on none; given per rank 0..{world - 1}: "
            f"{[bool(v) for v in cols['ids']]}"
        )
    if differ["directions"]:
        raise ValueError(f"directions must be the same on every rank; got codes {cols['directions']} on {ranks}")
    rpn = cols["ranks_per_node"]
    if _STRATEGY_CODES[cols["strategy"][0]] == "auto":
        return  # its node size is only a hint (strategies/auto.py), and it picks gather only where the roads agree
    if differ["ranks_per_node"]:
        raise ValueError(f"ranks_per_node (hierarchical) must be the same on every rank; got {rpn} on {ranks}")
    if rpn[0] and world % rpn[0]:
        raise ValueError(f"ranks_per_node={rpn[0]} must divide the group's {world} ranks (nodes of equal size)")
    # Only gather's CLIP backward differs between the roads: the eager one keeps the texts it gathered
    # in the forward, the compiled one (a separate custom op) gathers them again.
    gather_clip = _STRATEGY_CODES[cols["strategy"][0]] == "gather" and _LOSS_CODES[cols["loss"][0]] == "clip"
    if differ["compiled"] and gather_clip and cols["grads"][0]:
        compiled = [bool(v) for v in cols["compiled"]]
        raise ValueError(
            "strategy='gather' with clip_loss needs torch.compile on every rank or on none (the compiled "
            f"backward gathers the texts again); compiled per rank 0..{world - 1}: {compiled}"
        )


def report_invalid(features: object, group: Optional["dist.ProcessGroup"]) -> None:
    """Join the layout exchange with an 'invalid arguments' row (this rank's input failed
    validation), so that the other ranks raise a ValueError instead of waiting for it forever.
    The caller then raises its own, specific error."""
    pg = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(pg)
    if isinstance(features, Tensor):
        device = features.device
    elif dist.get_backend(pg) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mine = torch.full((len(_COLUMNS),), _INVALID, dtype=torch.int64, device=device)
    _all_gather_single(mine.new_empty(world * len(_COLUMNS)), mine, group=pg)


@contextmanager
def count_bytes() -> Iterator[list[int]]:
    """Count what this rank sends inside the block; yields [bytes, messages]: a message is one collective
    call or one point-to-point send (what pays a latency; `megabatch plan --time` predicts both)."""
    global _sent
    outer, _sent = _sent, [0, 0]
    try:
        yield _sent
    finally:
        if outer is not None:
            outer[0] += _sent[0]
            outer[1] += _sent[1]
        _sent = outer


def _count(nbytes: float) -> None:
    if _sent is not None:
        _sent[0] += int(nbytes)
        _sent[1] += 1


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def gather_rows(t: Tensor, lay: Layout, sizes: Sequence[int]) -> Tensor:
    """All-gather every rank's (sizes[r], ...) rows into one (sum(sizes), ...) tensor, in rank order.

    Uneven sizes are padded to the largest for the collective and the padding is dropped.
    """
    bmax, world = max(sizes), lay.world
    pad = t.contiguous() if t.shape[0] == bmax else torch.cat([t, t.new_zeros(bmax - t.shape[0], *t.shape[1:])])
    out = t.new_empty(world * bmax, *t.shape[1:])
    _all_gather_single(out, pad, group=lay.group)
    _count((world - 1) * _nbytes(pad))
    if all(b == bmax for b in sizes):
        return out
    return torch.cat([out[q * bmax : q * bmax + b] for q, b in enumerate(sizes)])


def all_reduce(t: Tensor, lay: Layout, op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of `t` over the group; returns `t`."""
    dist.all_reduce(t, op=op, group=lay.group)
    _count(2 * (lay.world - 1) / lay.world * _nbytes(t))
    return t


def all_reduce_lse(part: Tensor, lay: Layout) -> Tensor:
    """log(sum_r exp(part_r)) elementwise over ranks, max-shifted: two all-reduces of part's size."""
    shift = all_reduce(part.clone(), lay, dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = all_reduce(torch.exp(part - shift), lay)
    return shift + torch.log(total)


def use_reduce_scatter(t: Tensor, lay: Layout) -> bool:
    """NCCL reduce-scatters; gloo (whose reduce-scatter older torch lacks) all-reduces instead."""
    return t.is_cuda and "nccl" in str(dist.get_backend(lay.group))


def reduce_rows(t: Tensor, lay: Layout, sizes: Sequence[int]) -> Tensor:
    """Sum over ranks of a (sum(sizes), ...) tensor, returning only this rank's rows (sizes[rank], ...).

    NCCL: one reduce-scatter (padded to equal chunks when sizes differ); other backends (gloo,
    whose reduce-scatter is missing on older torch): all-reduce, then slice.
    """
    lo, b = sum(sizes[: lay.rank]), sizes[lay.rank]
    if not use_reduce_scatter(t, lay):
        return all_reduce(t, lay)[lo : lo + b]
    bmax = max(sizes)
    if any(s != bmax for s in sizes):
        padded = t.new_zeros(lay.world * bmax, *t.shape[1:])
        for q, s in enumerate(sizes):
            o = sum(sizes[:q])
            padded[q * bmax : q * bmax + s] = t[o : o + s]
        t = padded
    out = t.new_empty(bmax, *t.shape[1:])
    _reduce_scatter_single(out, t.contiguous(), group=lay.group)
    _count((lay.world - 1) / lay.world * _nbytes(t))
    return out[:b]


def start_p2p(sends: Sequence[tuple[Tensor, int, int]], recvs: Sequence[tuple[Tensor, int, int]], lay: Layout) -> list:
    """Post (tensor, group_rank, tag) sends and receives at once; returns the works to wait on.

    Tags keep gloo's matching unambiguous (NCCL matches by order, which is the same on both ends).
    Empty tensors are never sent nor received (both ends know the sizes from the layout).
    """
    sends = [op for op in sends if op[0].numel() > 0]
    recvs = [op for op in recvs if op[0].numel() > 0]
    ops = [dist.P2POp(dist.isend, t, lay.peer(p), lay.group, tag) for t, p, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, lay.peer(p), lay.group, tag) for t, p, tag in recvs]
    for t, _, _ in sends:
        _count(_nbytes(t))
    return dist.batch_isend_irecv(ops) if ops else []


def hop_home(done: Sequence[Tensor], n: int, to: int, frm: int, tag: int, lay: Layout) -> list[Tensor]:
    """The last hop of a travelling block's completed accumulators (ring, hierarchical): send `done`, which
    belong to group rank `to`, there, and receive this rank's own `n` rows from `frm` (tags from `tag` on)."""
    home = [a.new_empty(n, *a.shape[1:]) for a in done]
    tags = range(tag, tag + len(done))
    sends = [(a, to, k) for a, k in zip(done, tags)]
    recvs = [(a, frm, k) for a, k in zip(home, tags)]
    wait(start_p2p(sends, recvs, lay))
    return home


def wait(works: list) -> None:
    for w in works:
        w.wait()
