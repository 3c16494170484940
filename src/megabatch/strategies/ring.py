"""`ring` strategy: column blocks travel round the ring of ranks; memory O((b + n) * D) whatever W.

Rank r keeps its images. At step t = 0..W-1 it holds the column block of rank q = r - t (mod W)
(texts, their ids, statistics) and visits it, while the block moves on to rank r + 1 and the next
one arrives from rank r - 1 (async isend/irecv posted before the compute, waited after it). The
block's *accumulators* (CLIP's partial column log-sum-exps and positive sums, or the partial text
gradients) follow it one hop behind: what rank r adds to block q's accumulators at step t is sent at
step t + 1, and after visiting every rank the completed accumulators take one final hop home (the
last rank holding block q is q - 1). Sizes may differ per rank, and a rank may hold no texts (an
empty block is never sent: both ends know the sizes from the layout). Each pair (i, j) is computed
once per pass, by the owner of image i.

Communication per rank (bytes sent; e = feature element size, f = 4 (8 for float64) for gradients,
n_q = the blocks passing through): every pass sends (W-1) blocks of n_q * (D*e [+ 8 with ids]
[+ the travelling statistics]) and W accumulators of n_q * (their width): CLIP forward 8 (16 more
with ids) per text, CLIP backward the column statistics 8 (16 with ids) with the block and text
gradients D*f as the accumulator, SigLIP (forward only) text gradients D*f. About an all-gather plus
a reduce-scatter, spread over W steps that overlap the compute. Plus 12 int64 per rank of metadata.
Memory per rank: O((bmax + nmax) * D), independent of W (W >= 3): the block being computed on, the
next one arriving, the accumulators received and the ones being sent, and this step's contribution.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import _comm
from .base import Block, Visit, combine_into

_TAGS = 16  # tags per step: block tensors use 0..7, accumulators 8..15


class Ring:
    name = "ring"

    def __init__(self, lay: _comm.Layout):
        self.lay = lay
        self.visits_once = lay.world == 1

    def circulate(self, fixed: Sequence[Tensor], travel: Sequence[Tensor], visit: Visit,
                  accs: Sequence[str] = ()) -> list[Tensor]:
        lay = self.lay
        world, r = lay.world, lay.rank
        cur, src = [t.contiguous() for t in (*fixed, *travel)], r
        assert len(cur) <= _TAGS // 2 and len(accs) <= _TAGS // 2
        done: Optional[list[Tensor]] = None  # accumulators completed at the previous step, for rank r + 1
        for t in range(world):
            sends: list[tuple[Tensor, int, int]] = []
            recvs: list[tuple[Tensor, int, int]] = []
            nxt, acc_in = cur, None
            if t < world - 1:  # the block moves on while we compute on it
                nsrc = (r - t - 1) % world
                nxt = [u.new_empty(lay.tsizes[nsrc], *u.shape[1:]) for u in cur]
                sends += [(u, r + 1, _TAGS * t + k) for k, u in enumerate(cur)]
                recvs += [(u, r - 1, _TAGS * t + k) for k, u in enumerate(nxt)]
            if t > 0 and accs:  # the accumulators of the block we hold follow it
                assert done is not None
                acc_in = [a.new_empty(lay.tsizes[src], *a.shape[1:]) for a in done]
                sends += [(a, r + 1, _TAGS * t + _TAGS // 2 + k) for k, a in enumerate(done)]
                recvs += [(a, r - 1, _TAGS * t + _TAGS // 2 + k) for k, a in enumerate(acc_in)]
            works = _comm.start_p2p(sends, recvs, lay)
            parts = list(visit(Block(cur, lay.toffset(src))))
            assert len(parts) == len(accs)
            _comm.wait(works)
            if accs:
                if acc_in is None:
                    done = [p.contiguous() for p in parts]
                else:
                    done = [combine_into(kind, a, p) for kind, a, p in zip(accs, acc_in, parts)]
            del parts, acc_in, works  # no longer held while the next block is computed on
            cur, src = nxt, (r - t - 1) % world
        if not accs:
            return []
        assert done is not None
        if world == 1:
            return done
        return _comm.hop_home(done, lay.tsizes[r], r + 1, r - 1, _TAGS * world, lay)

    def release(self) -> None:
        pass

    def all_sum(self, t: Tensor) -> Tensor:
        return _comm.all_reduce(t.clone(), self.lay)

