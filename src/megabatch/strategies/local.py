"""`local` strategy: one process's batch, no communication (also the single-GPU path).

CLIP: forward runs the statistics pass (row and column log-sum-exp: 1 GEMM) and saves only the
features and those O(B) vectors; backward recomputes the tiles for the gradients (3 GEMMs).
SigLIP: a tile's gradient needs nothing global, so when gradients are wanted the forward computes
them in the same pass (3 GEMMs in all) and saves them; backward only scales by the incoming grad.

`weight` multiplies the loss and every gradient: 1 here; the distributed strategies reuse these
pieces with their own normalisation.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._checks import compute_dtype
from ..kernels.base import BlockKernels


def _no_autocast(t: Tensor) -> Any:
    return torch.autocast(t.device.type, enabled=False)


# Rows per chunk of the O(b * D) helpers below: their temporaries are (ROW_CHUNK, D) compute-dtype
# tensors (64 MiB at D = 512), never (b, D) ones.
ROW_CHUNK = 1 << 15


def clip_diagonal(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """Positive logits S_ii = s * x_i . y_i in the compute dtype, a chunk of rows at a time (O(b) memory
    beyond a chunk)."""
    cd = compute_dtype(x.dtype)
    out = torch.empty(x.shape[0], dtype=cd, device=x.device)
    for i in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(i, i + ROW_CHUNK)
        torch.sum(x[rows].to(cd) * y[rows].to(cd), dim=-1, out=out[rows])
    return out.mul_(scale.to(cd))


def scalar_grad(meta: tuple[torch.Size, torch.dtype], total: Tensor) -> Tensor:
    """Shape and cast a summed scalar gradient like the parameter it belongs to."""
    shape, dtype = meta
    return total.to(dtype).reshape(shape)


def rowdot(x: Tensor, gx: Tensor) -> Tensor:
    """sum_i x_i . gx_i in gx's dtype, a chunk of rows at a time: no (b, D) temporary."""
    total = gx.new_zeros(())
    for i in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(i, i + ROW_CHUNK)
        total = total + (x[rows].to(gx.dtype) * gx[rows]).sum()
    return total


class RowFinisher:
    """Finishes the row side from the unscaled row gradient gx: dx = mult * gx in x's dtype (if
    wanted) and dot = sum_i x_i . gx_i in the compute dtype (dL/ds is a multiple of it).

    It is a RowSink (kernels/base.py): handed to a single-block kernel call it takes gx in finished
    row chunks, so no (b, D) compute-dtype gx ever exists, only dx. A strategy that accumulates gx
    over several blocks calls `whole(gx)` instead."""

    def __init__(self, x: Tensor, mult: Tensor, want_dx: bool):
        self.x, self.mult, self.want_dx = x, mult, want_dx
        self.dot = mult.new_zeros(())
        self._dx: Optional[Tensor] = None

    def __call__(self, r0: int, gx: Tensor) -> None:
        rows = slice(r0, r0 + gx.shape[0])
        self.dot = self.dot + rowdot(self.x[rows], gx)
        if self.want_dx:
            if self._dx is None:
                self._dx = torch.zeros(self.x.shape, dtype=self.x.dtype, device=self.x.device)
            self._dx[rows] = gx.mul_(self.mult)

    def whole(self, gx: Tensor) -> None:
        """All rows at once; gx is consumed (scaled in place, so no second (b, D) buffer for fp32 inputs)."""
        self.dot = rowdot(self.x, gx)
        if self.want_dx:
            self._dx = gx.mul_(self.mult).to(self.x.dtype)

    @property
    def dx(self) -> Optional[Tensor]:
        if self.want_dx and self._dx is None:  # no row was handed over: an empty column block
            self._dx = torch.zeros(self.x.shape, dtype=self.x.dtype, device=self.x.device)
        return self._dx


def finish_clip_rows(
    ctx: Any, x: Tensor, gx: Tensor, g: Tensor, s: Tensor, scale: Tensor
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """CLIP's image-feature and scale gradients (dx, ds) from this rank's accumulated unscaled gx
    (consumed), for the strategies that sum gx over several blocks."""
    fin = RowFinisher(x, g * s, ctx.needs_input_grad[0])
    fin.whole(gx)
    return fin.dx, clip_scale_grad(ctx, fin, g, scale)


def clip_scale_grad(ctx: Any, fin: RowFinisher, g: Tensor, scale: Tensor) -> Optional[Tensor]:
    """dL/ds = g * sum_i x_i . gx_i, shaped like logit_scale (None if not wanted)."""
    return scalar_grad((scale.shape, scale.dtype), g * fin.dot) if ctx.needs_input_grad[2] else None


def stash_siglip_grads(
    ctx: Any, fin: RowFinisher, dy: Tensor, gbias: Tensor, scale: Tensor, bias: Tensor
) -> None:
    """Save SigLIP's gradients, computed in the forward pass, for `replay_siglip_grads`.

    fin: the finished row side (mult = s, dx wanted); dy: the finished text gradient in the features'
    dtype. The feature gradients are kept in the inputs' dtype (what backward returns anyway) and
    the scale's as the O(b.D) identity dL/ds = sum(x * gx)."""
    ctx.save_for_backward(fin.dx, dy, fin.dot, gbias)
    ctx.meta = ((scale.shape, scale.dtype), (bias.shape, bias.dtype))


def finish_siglip_rows(
    ctx: Any, x: Tensor, gx: Tensor, dy: Tensor, s: Tensor, gbias: Tensor, scale: Tensor, bias: Tensor
) -> None:
    """`stash_siglip_grads` from this rank's accumulated unscaled gx (consumed), for the strategies
    that sum gx over several blocks."""
    fin = RowFinisher(x, s, want_dx=True)
    fin.whole(gx)
    stash_siglip_grads(ctx, fin, dy, gbias, scale, bias)


def replay_siglip_grads(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    """The four input gradients (x, y, scale, bias) saved by `stash_siglip_grads`, times `grad`."""
    dx, dy, ds, db = ctx.saved_tensors
    scale_meta, bias_meta = ctx.meta
    g = grad.to(ds.dtype)
    return (
        dx * g.to(dx.dtype) if ctx.needs_input_grad[0] else None,
        dy * g.to(dy.dtype) if ctx.needs_input_grad[1] else None,
        scalar_grad(scale_meta, g * ds) if ctx.needs_input_grad[2] else None,
        scalar_grad(bias_meta, g * db) if ctx.needs_input_grad[3] else None,
    )


class _LocalClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels) -> Tensor:
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s = scale.detach().to(cd)
            row_lse, col_lse = kernels.clip_stats(x, y, s)
            diag = clip_diagonal(x, y, s).to(row_lse.dtype)
            # Term by term: lse_i - S_ii is small where the sums of each are large.
            loss = (((row_lse - diag).sum() + (col_lse - diag).sum()) / (2 * x.shape[0])).to(cd)
        ctx.kernels = kernels
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s = scale.detach().to(cd)
            g = grad.to(cd)
            # The rows are finished as the kernels complete them: no (b, D) fp32 gx, only gy's.
            fin = RowFinisher(x, g * s, ctx.needs_input_grad[0])
            _, gy = ctx.kernels.clip_grads(
                x, y, s, row_lse, col_lse, weight=1.0 / (2 * x.shape[0]), diagonal=True, rows=fin
            )
            dy = gy.mul_(g * s).to(y.dtype) if ctx.needs_input_grad[1] else None
            del gy
        return fin.dx, dy, clip_scale_grad(ctx, fin, g, scale), None


class _LocalSiglip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels) -> Tensor:
        want = any(ctx.needs_input_grad[:4])
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, beta = scale.detach().to(cd), bias.detach().to(cd)
            fin = RowFinisher(x, s, want_dx=True)
            loss, _, gy, gbias = kernels.siglip_block(
                x, y, s, beta, weight=1.0 / x.shape[0], diagonal=True, grads=want, rows=fin if want else None
            )
            if want:
                assert gy is not None and gbias is not None
                stash_siglip_grads(ctx, fin, gy.mul_(s).to(y.dtype), gbias, scale, bias)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*replay_siglip_grads(ctx, grad), None)


def clip(x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This process's CLIP loss (group is ignored: no communication)."""
    return _LocalClip.apply(x, y, scale, kernels)


def siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This process's SigLIP loss (group is ignored: no communication)."""
    return _LocalSiglip.apply(x, y, scale, bias, kernels)
