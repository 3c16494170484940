"""The block-kernel contract shared by every backend.

A block is a pair (x, y): x is a (b, D) block of image features (rows), y a (n, D) block of text
features (columns); S = s * x @ y.T is never returned. `diagonal=True` says the block holds the
positive pairs on its main diagonal (row i pairs with column i, i < min(b, n)); otherwise it has
no positives. Every result is in the *compute dtype* (float64 for float64 inputs, else float32),
whatever the input dtype; `scale` and `bias` are 0-dim tensors in the compute dtype.

CLIP (two passes over the block):
  clip_stats  -> (row_lse (b,), col_lse (n,)): log-sum-exp of S over this block only. A backend may
                 return them at a higher precision than the compute dtype (the torch backend gives
                 float64, so exp(S - lse) stays exact to fp32 rounding when |S| is large); callers
                 merge blocks with torch.logaddexp in whatever dtype comes back and hand the result
                 to the same backend's clip_grads.
  clip_grads  -> (gx (b, D), gy (n, D)) with G = weight * (exp(S - r_i) + exp(S - c_j) - 2 * I):
                 gx = G @ y, gy = G.T @ x (unscaled by s: dL/dx = s * gx, dL/ds = sum(x * gx)).
SigLIP (one pass): siglip_block -> (loss, gx, gy, gbias) for the block, all multiplied by `weight`:
  loss = weight * sum_ij softplus(-z_ij (S_ij + bias)), G = -weight * z * sigmoid(-z (S + bias)),
  gx = G @ y, gy = G.T @ x, gbias = sum(G). With grads=False only the loss is computed (the rest None).

Finished rows (`rows`, both gradient calls): when a caller passes a RowSink, the backend hands it gx
in finished row chunks instead of returning it (gx comes back None): rows(r0, chunk) with chunk
equal to gx[r0 : r0 + len(chunk)] in the compute dtype, every row exactly once, in any order, and
no row changes after it was handed over (with grads=False the sink is never called). The chunk
may be the backend's reused buffer: the sink consumes it before returning and may overwrite it.
This is what lets a single-block caller turn gx into s * gx in the inputs' dtype as it goes, so
no (b, D) compute-dtype accumulator of the row side ever exists (only gy's).
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import Tensor


RowSink = Callable[[int, Tensor], None]


class BlockKernels(Protocol):
    name: str

    def supports(self, device: torch.device) -> bool: ...

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]: ...

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float, diagonal: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Optional[Tensor], Tensor]: ...

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, diagonal: bool, grads: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]: ...
