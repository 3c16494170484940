"""SigLIP's sigmoid loss over any strategy and backend: one autograd.Function.

L = -(1 / B_img) sum_ij log sigmoid(z_ij (S_ij + bias)), z_ij = +1 for every positive pair, -1
otherwise, B_img the number of images in the global batch (the SigLIP paper's normalisation).
A tile's gradient needs nothing global, so when gradients are wanted the forward computes them in
the same pass (3 GEMM-sized passes in all), the text gradients coming home as the accumulator, and
saves them in the inputs' dtype; backward only scales them by the incoming gradient (no
communication).

Distributed convention (docs/design.md): mean_r L_r = L, feature gradients W * dL/d(features); the scale
and bias gradients on rank r are exactly dL_r/ds and dL_r/dbias (its row stripe).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._numerics import RowFinisher, compute_dtype, no_autocast, replay_grads, stash_grads
from ..kernels.base import BlockKernels
from ..strategies import Block, Strategy
from .positives import block_positives


def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, strat: Strategy, kernels: BlockKernels,
                   xid: Optional[Tensor], yid: Optional[Tensor], want: bool
                   ) -> tuple[Tensor, Optional[tuple[Tensor, Optional[Tensor], Tensor, Tensor]]]:
    """This rank's loss L_r (compute dtype, 0-dim) and, if `want`, its gradients for an upstream
    gradient of 1: (dx, dy or None when the texts need none, sum for dscale, sum for dbias), the
    last two 0-dim in the compute dtype."""
    lay = strat.lay
    b = x.shape[0]
    y_acc = want and lay.y_grad
    with no_autocast(x):
        cd = compute_dtype(x.dtype)
        s, beta = scale.detach().to(cd), bias.detach().to(cd)
        weight = lay.world / lay.total
        loss = torch.zeros((), dtype=cd, device=x.device)
        gbias = torch.zeros((), dtype=cd, device=x.device)
        fin = RowFinisher(x, s, want_dx=True)
        gx = torch.zeros(b, x.shape[1], dtype=cd, device=x.device) if want and not strat.visits_once else None

        def visit(blk: Block) -> list[Tensor]:
            nonlocal loss, gbias
            if not (b and blk.n):
                return [torch.zeros(blk.n, x.shape[1], dtype=cd, device=x.device)] if y_acc else []
            part, gxp, gyp, gbp = kernels.siglip_block(
                x, blk.tensors[0], s, beta, weight=weight, pos=block_positives(strat, b, xid, blk), grads=want,
                rows=fin if want and gx is None else None,
            )
            loss = loss + part
            if not want:
                return []
            assert gbp is not None and gyp is not None
            gbias = gbias + gbp
            if gx is not None:
                assert gxp is not None
                gx.add_(gxp)
            return [gyp] if y_acc else []

        fixed = [y] if yid is None else [y, yid]
        home = strat.circulate(fixed, [], visit, ["sum"] if y_acc else [])
        if not want:
            return loss, None
        if gx is not None:
            fin.whole(gx)
        dx = fin.dx
        assert dx is not None
        dy = home[0].mul_(s).to(y.dtype) if home else None
    return loss, (dx, dy, fin.dot, gbias)


class _Siglip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, strat: Strategy,
                kernels: BlockKernels, xid: Optional[Tensor], yid: Optional[Tensor]) -> Tensor:
        loss, grads = siglip_forward(x, y, scale, bias, strat, kernels, xid, yid, any(ctx.needs_input_grad[:4]))
        if grads is not None:
            dx, dy, gscale, gbias = grads
            stash_grads(ctx, dx, dy, [(gscale, scale), (gbias, bias)])
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*replay_grads(ctx, grad), None, None, None, None)


def siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, strat: Strategy, kernels: BlockKernels,
           xid: Optional[Tensor] = None, yid: Optional[Tensor] = None) -> Tensor:
    """This rank's SigLIP loss L_r. x (b_r, D), y (n_r, D); scale, bias 0-dim; ids (b_r,), (n_r,) or None."""
    return _Siglip.apply(x, y, scale, bias, strat, kernels, xid, yid)
