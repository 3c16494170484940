"""`gather` strategy: all-gather the column blocks, each rank meets its images with all of them.

Rank r all-gathers every rank's column block (texts, ids, statistics: padded to the largest n for
the collective) and makes ONE visit of the whole (N, ...) block, so each pair (i, j) is computed by
exactly one rank, the owner of image i (the kernels tile internally: the b_r x N stripe never
exists at once). The visit's contributions (N, ...) are then reduced to their owners: "sum" by a
reduce-scatter (NCCL; gloo: all-reduce and slice), "lse" by a max-shifted all-reduce (two of N
floats) and a slice. What is fixed across passes (the texts and their ids) is gathered once per
loss call and kept for the backward.

Communication per rank (bytes sent, ring cost model; e = feature element size): the all-gather
(W-1) * nmax * (D*e + 8 with ids); CLIP forward 2 all-reduces of N*8 (column log-sum-exps) plus,
with ids, a reduce of N*16 (positive counts and logit sums) and an all-reduce of 2 floats; CLIP
backward an all-gather of (W-1)*nmax*8 (16 with ids) column statistics and the (N, D) text-gradient
reduction, N*D*f*(W-1)/W with NCCL's reduce-scatter (2x with gloo's all-reduce), f = 4 (8 for
float64); SigLIP the same gradient reduction, in the forward. Plus 12 int64 per rank of metadata.
Memory per rank: O(N * D) (the gathered texts and the (N, D) text gradients): it grows with W.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import _comm
from .base import Block, Visit


class Gather:
    name = "gather"

    def __init__(self, lay: _comm.Layout):
        self.visits_once = True  # one visit: the row side can be finished as the kernels go
        self.lay = lay
        self._fixed: Optional[list[Tensor]] = None  # the gathered fixed tensors, kept for later passes

    def _gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [_comm.gather_rows(t.contiguous(), self.lay, self.lay.tsizes) for t in tensors]

    def circulate(self, fixed: Sequence[Tensor], travel: Sequence[Tensor], visit: Visit,
                  accs: Sequence[str] = ()) -> list[Tensor]:
        if self._fixed is None:
            self._fixed = self._gather(fixed)
        assert len(self._fixed) == len(fixed)
        parts = list(visit(Block([*self._fixed, *self._gather(travel)], 0)))
        assert len(parts) == len(accs)
        lo, n = self.lay.toffset(self.lay.rank), self.lay.tsizes[self.lay.rank]
        out = []
        for kind, part in zip(accs, parts):
            if kind == "sum":
                out.append(_comm.reduce_rows(part, self.lay, self.lay.tsizes))
            else:
                out.append(_comm.all_reduce_lse(part, self.lay)[lo : lo + n])
        return out

    def release(self) -> None:
        """Drop the gathered texts (called once the last pass that needs them is done)."""
        self._fixed = None

    def all_sum(self, t: Tensor) -> Tensor:
        return _comm.all_reduce(t.clone(), self.lay)
