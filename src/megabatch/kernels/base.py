"""The block-kernel contract shared by every backend.

A block is a pair (x, y): x is a (b, D) block of image features (rows), y a (n, D) block of text
features (columns), b and n independent; S = s * x @ y.T is never returned. `pos` says which pairs
of the block are positive (see Positives; None: the block has none). Every result is in the
*compute dtype* (float64 for float64 inputs, else float32), whatever the input dtype; `scale` and
`bias` are 0-dim tensors in the compute dtype. Kernels are unnormalised: the loss families apply
the batch normalisation (CLIP's is a device tensor when positives are given by ids).

CLIP (two passes over the block):
  clip_stats  -> ClipStats: the row and column log-sum-exp of S over this block only, and the sum of
                 the positive logits of each row and column (the same tile values the log-sum-exps
                 are made of, so lse - positive is as exact as plain cross-entropy). A backend may
                 return the log-sum-exps at a higher precision than the compute dtype (the torch
                 backend gives float64, so exp(S - lse) stays exact to fp32 rounding when |S| is
                 large); callers merge blocks with torch.logaddexp in whatever dtype comes back and
                 hand the result to the same backend's clip_grads. row_lse / col_lse given to
                 clip_grads may be +inf (that row or column takes no part: its term is 0).
  clip_grads  -> BlockGrads (gx (b, D), gy (n, D)), gx = G @ y and gy = G.T @ x (unscaled by s), with
                 G_ij = weight * (exp(S_ij - row_lse_i) + exp(S_ij - col_lse_j) - pos_ij * (rt_i + ct_j)),
                 `targets` = (rt, ct): floats (index positives) or (b,) and (n,) tensors (ids).
SigLIP (one pass): siglip_block -> SiglipBlock (loss, gx, gy, gbias) for the block, all multiplied by
  `weight`: loss = weight * sum_ij softplus(-z_ij (S_ij + bias)), z = +1 on positives, -1 elsewhere,
  G = -weight * z * sigmoid(-z (S + bias)), gx = G @ y, gy = G.T @ x, gbias = sum(G).
  With grads=False only the loss is computed (gx, gy and gbias are None).
Both results are NamedTuples of the same fields whatever the flags: a field not computed is None
(never absent), so callers read them by name.

Finished rows (`rows`, both gradient calls): when a caller passes a RowSink, the backend hands it gx
in finished row chunks instead of returning it (the gx field is None): rows(r0, chunk) with chunk
equal to gx[r0 : r0 + len(chunk)] in the compute dtype, every row exactly once, in any order, and
no row changes after it was handed over (with grads=False the sink is never called). The chunk
may be the backend's reused buffer: the sink consumes it before returning and may overwrite it.
This is what lets a single-block caller turn gx into s * gx in the inputs' dtype as it goes, so
no (b, D) compute-dtype accumulator of the row side ever exists (only gy's).
Empty blocks (b = 0 or n = 0) are never passed to a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

RowSink = Callable[[int, Tensor], None]
Target = Union[float, Tensor]


@dataclass(frozen=True)
class Positives:
    """The positive pairs of a block, in one of two forms.

    Index: pair (i, i + offset) for 0 <= i < count (and 0 <= i + offset < n): the textbook diagonal,
    shifted where the block's columns start elsewhere than the rows' own texts.
    Ids: pair (i, j) iff image_ids[i] == text_ids[j] (int64 (b,) and (n,), compared inside the tiles).
    """

    offset: int = 0
    count: int = 0
    image_ids: Optional[Tensor] = None
    text_ids: Optional[Tensor] = None

    @property
    def by_ids(self) -> bool:
        return self.image_ids is not None

    def band(self, r0: int, rows: int, n: int) -> tuple[int, int]:
        """Index form: the rows [lo, hi) of rows r0 .. r0 + rows whose positive lies in columns 0 .. n."""
        lo = max(r0, -self.offset)
        hi = min(r0 + rows, self.count, n - self.offset)
        return lo, max(lo, hi)

    def restrict(self, r0: int, rows: int, c0: int, cols: int) -> Optional["Positives"]:
        """The positives of the sub-block rows r0.., columns c0.. (None if it holds none)."""
        if self.by_ids:
            assert self.image_ids is not None and self.text_ids is not None
            return Positives(image_ids=self.image_ids[r0:r0 + rows], text_ids=self.text_ids[c0:c0 + cols])
        shifted = Positives(offset=self.offset + r0 - c0, count=self.count - r0)
        lo, hi = shifted.band(0, rows, cols)
        return shifted if hi > lo else None

    @staticmethod
    def index(offset: int, count: int, b: int, n: int) -> Optional["Positives"]:
        """Index positives (i, i + offset), i < count, of a (b, n) block; None when none falls inside."""
        pos = Positives(offset=offset, count=min(count, b))
        lo, hi = pos.band(0, b, n)
        return pos if hi > lo else None


class ClipStats(NamedTuple):
    """clip_stats' result for one block. row_pos / col_pos: float64 sums of the positive logits
    (None when the block has no positives)."""

    row_lse: Tensor
    col_lse: Tensor
    row_pos: Optional[Tensor]
    col_pos: Optional[Tensor]


class BlockGrads(NamedTuple):
    """clip_grads' result: gx (b, D), None when a RowSink took the rows, and gy (n, D)."""

    gx: Optional[Tensor]
    gy: Tensor


class SiglipBlock(NamedTuple):
    """siglip_block's result: the block's loss (0-dim) and, with grads=True, gx (b, D; None when a
    RowSink took the rows), gy (n, D) and gbias (0-dim); with grads=False those three are None."""

    loss: Tensor
    gx: Optional[Tensor]
    gy: Optional[Tensor]
    gbias: Optional[Tensor]


class BlockKernels(Protocol):
    name: str

    def supports(self, device: torch.device) -> bool: ...

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor, pos: Optional[Positives]) -> ClipStats: ...

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float,
        pos: Optional[Positives], targets: tuple[Target, Target] = (1.0, 1.0), rows: Optional[RowSink] = None,
    ) -> BlockGrads: ...

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, pos: Optional[Positives],
        grads: bool, rows: Optional[RowSink] = None,
    ) -> SiglipBlock: ...
