"""The one interface every strategy implements: how the blocks of the global batch move.

A loss family (losses/clip.py, losses/siglip.py) hands the strategy this rank's *column block*, the
texts and what travels with them, and a `visit` function. The strategy makes this rank's images meet
every rank's column block exactly once and combines, per column, the accumulators that the visits
return for the block's owner:

    block   = fixed + travel: tensors with one row per text of this rank (n_r, ...); `fixed` is the
              same in forward and backward (a strategy may keep what it gathered of it, `gather`
              does), `travel` is per pass (e.g. CLIP's column statistics in the backward)
    visit(Block) -> one contribution per accumulator, each (n_block, ...) aligned with the block's
              columns (or [] when no accumulator is wanted)
    accs    = the accumulators' combine kinds, in order: "sum" (added) or "lse" (log-sum-exp'd)
    returns this rank's completed accumulators, (n_r, ...) each

local: one visit of its own block. gather: all-gather the block, one visit of all of it, reduce the
contributions back to their owners. ring: W visits, the block and its accumulators travelling round
the ring. The family never knows which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from ._comm import Layout

ACC_KINDS = ("sum", "lse")


@dataclass(frozen=True)
class Block:
    """A column block as a visit sees it: its tensors (fixed then travel) and where its columns start
    in the global text order (all ranks' texts in rank order)."""

    tensors: list[Tensor]
    start: int

    @property
    def n(self) -> int:
        return self.tensors[0].shape[0]


Visit = Callable[[Block], Sequence[Tensor]]


class Strategy(Protocol):
    name: str
    lay: Layout
    visits_once: bool  # True: `visit` is called exactly once per pass (local, gather, a ring of one)

    def circulate(self, fixed: Sequence[Tensor], travel: Sequence[Tensor], visit: Visit,
                  accs: Sequence[str] = ()) -> list[Tensor]: ...

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum of `t` over the group's ranks (a new tensor; the identity on one process)."""
        ...

    def release(self) -> None:
        """Drop anything kept between passes (gather's gathered texts)."""
        ...


def combine_into(kind: str, acc: Tensor, part: Tensor) -> Tensor:
    """Merge a contribution into an accumulator in place ("sum" or "lse") and return it."""
    if kind == "sum":
        return acc.add_(part)
    return torch.logaddexp(acc, part, out=acc)
