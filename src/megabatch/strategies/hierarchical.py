"""`hierarchical` strategy: a ring between nodes, an all-gather within each node.

Group rank i sits on node i // R at local index i % R (R = ranks_per_node; W = M * R, the ranks of a
node contiguous, as torchrun numbers them). Every rank's column block is its *slice*. At step
t = 0..M-1 rank (n, l) holds the slice of rank (n - t mod M, l): the slices travel round M rings,
one per local index l, exactly as `ring` moves blocks (async isend/irecv to (n+1, l), from (n-1, l),
posted before the compute and waited after it), while the node's R ranks all-gather the slices they
hold into the whole column block of node n - t (contiguous in the global text order) and visit it
ONCE. The visit's contributions are reduced within the node back to the slice holders ("sum":
reduce-scatter on NCCL, all-reduce and slice on gloo; "lse": max-shifted all-reduce and slice) and
combined with the slice's accumulators, which follow the slice one hop behind and take a final hop
home, as in `ring`. Each pair (i, j) is computed once per pass, by the owner of image i. Sizes may
differ per rank and a slice may be empty (never sent p2p; the node all-gather pads to the node's
largest slice; a node block without texts is not gathered nor reduced). R = W is one node (one step,
gather-like, over the group itself); R = 1 is `ring` (no intra-node collective).

Intra-node collectives run on one process group per node (made once per node's ranks and cached,
by that node's ranks only: `use_local_synchronization`), p2p on the parent group. Each rank sends
M-1 slices (and M accumulator slices) across nodes in M steps, where ring's node-boundary rank
sends W-1 blocks over one link in W steps; the node links carry the all-gathers and reductions.

Communication per rank per pass (bytes sent; e = feature element size, f = 4 (8 for float64) for
gradients, n = the texts of a slice, N_k = the texts of node k's block, nmax_k its largest slice;
with equal sizes N_k = R * n, nmax_k = n), summed over the M steps (t = 0..M-1, k = n - t):
  p2p       (M-1) slices of n * (the block's width) and, when accumulators are wanted and M > 1,
            M accumulator slices of n * (their width);
  all-gather (R > 1, per block tensor) (R-1) * nmax_k * (its width);
  reduction (R > 1, per accumulator) "sum": 2(R-1)/R * N_k * width (gloo all-reduce) or
            (R-1) * nmax_k * width (NCCL reduce-scatter); "lse": two all-reduces of 2(R-1)/R * N_k * 8.
  CLIP forward: block y (D*e) [+ ids 8], accumulators column lse (8) [+ ids: positive sums 16, "sum"],
            plus with ids an all_sum of 2 float64 over the group; CLIP backward: block y, the column
            shift (8) [+ ids, the column targets 8], accumulator gy (D*f, "sum"); SigLIP (forward only):
            block y [+ ids], accumulator gy (D*f, "sum"). Plus 12 int64 per rank of metadata.
Messages per pass: one per non-empty p2p send, one per intra-node collective call (two per "lse").
Memory per rank: O(R * (bmax + nmax) * D) independent of M: the node block being visited and its
contributions (R slices each), the next slice arriving, the accumulator slices in flight.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import _comm
from .base import Block, Visit, combine_into

_TAGS = 16  # tags per step: slice tensors use 0..7, accumulators 8..15

# One process group per node (its global ranks, in order), made once and kept for the process's life.
_NODE_GROUPS: dict[tuple[int, ...], "dist.ProcessGroup"] = {}


def node_group(lay: _comm.Layout) -> Optional["dist.ProcessGroup"]:
    """The process group of this rank's node (None when R = 1: a node of one needs none; the group
    itself when R = W). Only the node's own ranks take part in making it."""
    r_node = lay.ranks_per_node
    if r_node == 1:
        return None
    if r_node == lay.world:
        return lay.group
    first = lay.rank // r_node * r_node
    ranks = tuple(lay.peer(first + j) for j in range(r_node))
    if ranks not in _NODE_GROUPS:
        _NODE_GROUPS[ranks] = dist.new_group(list(ranks), backend=dist.get_backend(lay.group),
                                             use_local_synchronization=True)
    return _NODE_GROUPS[ranks]


class Hierarchical:
    name = "hierarchical"

    def __init__(self, lay: _comm.Layout):
        if lay.ranks_per_node < 1 or lay.world % lay.ranks_per_node:
            raise ValueError(f"ranks_per_node must divide the group's {lay.world} ranks, got {lay.ranks_per_node}")
        self.lay = lay
        self.nodes = lay.world // lay.ranks_per_node
        self.visits_once = self.nodes == 1
        group = node_group(lay)
        r_node = lay.ranks_per_node
        # The node as a layout of its own: rank l of R ranks (the sizes are given per call).
        self.node = _comm.Layout(group, lay.rank % r_node, (0,) * r_node, (0,) * r_node, lay.y_grad, lay.ids)

    def _peer(self, node: int) -> int:
        """Group rank of the rank at this rank's local index on node `node` (mod M)."""
        r_node = self.lay.ranks_per_node
        return node % self.nodes * r_node + self.lay.rank % r_node

    def _node_sizes(self, node: int) -> tuple[int, ...]:
        r_node = self.lay.ranks_per_node
        return self.lay.tsizes[node * r_node : (node + 1) * r_node]

    def _gather(self, cur: Sequence[Tensor], node: int) -> list[Tensor]:
        """The whole column block of `node` from the slices this node's ranks hold."""
        sizes = self._node_sizes(node)
        if self.lay.ranks_per_node == 1 or max(sizes) == 0:
            return list(cur)
        return [_comm.gather_rows(u, self.node, sizes) for u in cur]

    def _reduce(self, kind: str, part: Tensor, node: int) -> Tensor:
        """This rank's slice of the node's summed (or log-sum-exp'd) contributions to `node`'s block."""
        sizes = self._node_sizes(node)
        if self.lay.ranks_per_node == 1 or max(sizes) == 0:
            return part.contiguous()
        if kind == "sum":
            return _comm.reduce_rows(part, self.node, sizes)
        lo = sum(sizes[: self.node.rank])
        return _comm.all_reduce_lse(part, self.node)[lo : lo + sizes[self.node.rank]]

    def circulate(self, fixed: Sequence[Tensor], travel: Sequence[Tensor], visit: Visit,
                  accs: Sequence[str] = ()) -> list[Tensor]:
        lay, nodes, r_node = self.lay, self.nodes, self.lay.ranks_per_node
        here, local = divmod(lay.rank, r_node)
        cur, src = [t.contiguous() for t in (*fixed, *travel)], here  # the slice of rank (src, local)
        assert len(cur) <= _TAGS // 2 and len(accs) <= _TAGS // 2
        done: Optional[list[Tensor]] = None  # the held slice's accumulators, completed at the previous step
        nxt_peer, prev_peer = self._peer(here + 1), self._peer(here - 1)
        for t in range(nodes):
            sends: list[tuple[Tensor, int, int]] = []
            recvs: list[tuple[Tensor, int, int]] = []
            nxt, acc_in = cur, None
            if t < nodes - 1:  # the slice moves on while the node computes on its block
                nsrc = (here - t - 1) % nodes
                n_next = lay.tsizes[nsrc * r_node + local]
                nxt = [u.new_empty(n_next, *u.shape[1:]) for u in cur]
                sends += [(u, nxt_peer, _TAGS * t + k) for k, u in enumerate(cur)]
                recvs += [(u, prev_peer, _TAGS * t + k) for k, u in enumerate(nxt)]
            if t > 0 and accs:  # the accumulators of the slice we hold follow it
                assert done is not None
                n_src = lay.tsizes[src * r_node + local]
                acc_in = [a.new_empty(n_src, *a.shape[1:]) for a in done]
                sends += [(a, nxt_peer, _TAGS * t + _TAGS // 2 + k) for k, a in enumerate(done)]
                recvs += [(a, prev_peer, _TAGS * t + _TAGS // 2 + k) for k, a in enumerate(acc_in)]
            works = _comm.start_p2p(sends, recvs, lay)
            block = self._gather(cur, src)
            parts = list(visit(Block(block, lay.toffset(src * r_node))))
            assert len(parts) == len(accs)
            del block
            mine = [self._reduce(kind, p, src) for kind, p in zip(accs, parts)]
            del parts
            _comm.wait(works)
            if accs:
                done = mine if acc_in is None else [combine_into(k, a, p) for k, a, p in zip(accs, acc_in, mine)]
            del mine, acc_in, works
            cur, src = nxt, (here - t - 1) % nodes
        if not accs:
            return []
        assert done is not None
        if nodes == 1:
            return done
        return _comm.hop_home(done, lay.tsizes[lay.rank], nxt_peer, prev_peer, _TAGS * nodes, lay)

    def release(self) -> None:
        pass

    def all_sum(self, t: Tensor) -> Tensor:
        return _comm.all_reduce(t.clone(), self.lay)



def env_ranks_per_node(group: Optional["dist.ProcessGroup"]) -> int:
    """R from torchrun's environment (LOCAL_WORLD_SIZE), checked against this rank's place: the ranks of
    a node must be contiguous in the group (group rank i on node i // R). ValueError if unset or not."""
    import os

    raw = os.environ.get("LOCAL_WORLD_SIZE")
    if raw is None:
        raise ValueError("strategy='hierarchical' needs ranks_per_node= (an int >= 1) or torchrun's "
                         "LOCAL_WORLD_SIZE in the environment; neither is set")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be an int >= 1 for strategy='hierarchical', got {raw!r}")
    r_node = int(raw)
    pg = group if group is not None else dist.group.WORLD
    pos, me = dist.get_rank(pg), dist.get_rank()
    if pos < 0:
        raise ValueError("this process is not a member of the given process group `group`")
    node = os.environ.get("GROUP_RANK")
    want = int(node) if node is not None and node.isdigit() else me // r_node
    first = pos // r_node * r_node
    members = [dist.get_global_rank(pg, first + j) for j in range(r_node) if first + j < dist.get_world_size(pg)]
    if me // r_node != want or any(g // r_node != want for g in members):
        raise ValueError(
            f"strategy='hierarchical' with ranks_per_node={r_node} (LOCAL_WORLD_SIZE) needs each node's ranks "
            f"contiguous in the group; this rank (global {me}, group rank {pos}, node {want}) is grouped with global "
            f"ranks {members}: pass ranks_per_node= explicitly or use a group ordered by node"
        )
    return r_node


def check_ranks_per_node(value: object) -> int:
    """An explicit ranks_per_node: an int >= 1 (TypeError / ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ranks_per_node must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {value}")
    return value


__all__ = ["Hierarchical", "check_ranks_per_node", "env_ranks_per_node", "node_group"]
