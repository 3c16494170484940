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


def clip_diagonal(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """Positive logits S_ii = s * x_i . y_i in the compute dtype, O(b * D)."""
    cd = compute_dtype(x.dtype)
    return scale.to(cd) * (x.to(cd) * y.to(cd)).sum(-1)


def scalar_grad(meta: tuple[torch.Size, torch.dtype], total: Tensor) -> Tensor:
    """Shape and cast a summed scalar gradient like the parameter it belongs to."""
    shape, dtype = meta
    return total.to(dtype).reshape(shape)


def rowdot(x: Tensor, gx: Tensor, rows: int = 1 << 15) -> Tensor:
    """sum_i x_i . gx_i in gx's dtype, a chunk of rows at a time: no (b, D) temporary."""
    total = gx.new_zeros(())
    for i in range(0, x.shape[0], rows):
        total = total + (x[i : i + rows].to(gx.dtype) * gx[i : i + rows]).sum()
    return total


def finish_clip_rows(ctx: Any, x: Tensor, gx: Tensor, g: Tensor, s: Tensor, scale: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """CLIP's image-feature and scale gradients (dx, ds) from this rank's accumulated unscaled gx,
    which is consumed (scaled in place, so no second (b, D) fp32 buffer exists)."""
    ds = scalar_grad((scale.shape, scale.dtype), g * rowdot(x, gx)) if ctx.needs_input_grad[2] else None
    dx = gx.mul_(g * s).to(x.dtype) if ctx.needs_input_grad[0] else None
    return dx, ds


def stash_siglip_grads(
    ctx: Any, x: Tensor, gx: Tensor, dy: Tensor, s: Tensor, gbias: Tensor, scale: Tensor, bias: Tensor
) -> None:
    """Save SigLIP's gradients, computed in the forward pass, for `replay_siglip_grads`.

    gx: this rank's unscaled (b, D) row gradient in the compute dtype (consumed); dy: the finished text
    gradient in the features' dtype. The feature gradients are kept in the inputs' dtype (what
    backward returns anyway) and the scale's as the O(b.D) identity dL/ds = sum(x * gx).
    """
    ds = rowdot(x, gx)
    ctx.save_for_backward(gx.mul_(s).to(x.dtype), dy, ds, gbias)
    ctx.meta = ((scale.shape, scale.dtype), (bias.shape, bias.dtype))


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
            gx, gy = ctx.kernels.clip_grads(x, y, s, row_lse, col_lse, weight=1.0 / (2 * x.shape[0]), diagonal=True)
            g = grad.to(cd)
            dx, ds = finish_clip_rows(ctx, x, gx, g, s, scale)
            dy = gy.mul_(g * s).to(y.dtype) if ctx.needs_input_grad[1] else None
        return dx, dy, ds, None


class _LocalSiglip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels) -> Tensor:
        want = any(ctx.needs_input_grad[:4])
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, beta = scale.detach().to(cd), bias.detach().to(cd)
            loss, gx, gy, gbias = kernels.siglip_block(
                x, y, s, beta, weight=1.0 / x.shape[0], diagonal=True, grads=want
            )
            if want:
                assert gx is not None and gy is not None and gbias is not None
                stash_siglip_grads(ctx, x, gx, gy.mul_(s).to(y.dtype), s, gbias, scale, bias)
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
