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

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .._numerics import RowFinisher, compute_dtype, no_autocast, replay_grads, stash_grads
from ..strategies import Block
from .options import Features, LossSpec
from .positives import block_positives


class SiglipResult(NamedTuple):
    """siglip_forward's result: the loss and, when any input needs a gradient, the gradients for an
    upstream gradient of 1 (else dx, dy, dscale and dbias are None; dy is None too when the texts
    need none). dscale, dbias: dL_r/ds and dL_r/dbias, 0-dim in the compute dtype (the caller
    shapes them like their parameters)."""

    loss: Tensor
    dx: Optional[Tensor]
    dy: Optional[Tensor]
    dscale: Optional[Tensor]
    dbias: Optional[Tensor]


def siglip_forward(spec: LossSpec, f: Features, scale: Tensor, bias: Tensor) -> SiglipResult:
    """This rank's loss L_r (compute dtype, 0-dim) and, if any of `spec.needs`, its gradients for an
    upstream gradient of 1 (see SiglipResult), over the strategy it starts (`spec.start`)."""
    want = any(spec.needs)
    strat = spec.start(f.x, f.y, (scale, bias))
    kernels = spec.kernels
    x, y, xid, yid = f
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
            part = kernels.siglip_block(
                x, blk.tensors[0], s, beta, weight=weight, pos=block_positives(strat, b, xid, blk), grads=want,
                rows=fin if want and gx is None else None,
            )
            loss = loss + part.loss
            if not want:
                return []
            assert part.gbias is not None and part.gy is not None
            gbias = gbias + part.gbias
            if gx is not None:
                assert part.gx is not None
                gx.add_(part.gx)
            return [part.gy] if y_acc else []

        fixed = [y] if yid is None else [y, yid]
        home = strat.circulate(fixed, [], visit, ["sum"] if y_acc else [])
        if not want:
            return SiglipResult(loss, None, None, None, None)
        if gx is not None:
            fin.whole(gx)
        dx = fin.dx
        assert dx is not None
        dy = home[0].mul_(s).to(y.dtype) if home else None
    return SiglipResult(loss, dx, dy, fin.dot, gbias)


class _Siglip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor,
                xid: Optional[Tensor], yid: Optional[Tensor]) -> Tensor:
        res = siglip_forward(spec, Features(x, y, xid, yid), scale, bias)
        if res.dx is not None:
            assert res.dscale is not None and res.dbias is not None
            stash_grads(ctx, res.dx, res.dy, [(res.dscale, scale), (res.dbias, bias)])
        return res.loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return (None, *replay_grads(ctx, grad, ctx.needs_input_grad[1:5]), None, None)


def siglip(spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, xid: Optional[Tensor] = None,
           yid: Optional[Tensor] = None) -> Tensor:
    """This rank's SigLIP loss L_r, the eager road (losses.ops.siglip is the compiled one, same
    arguments). x (b_r, D), y (n_r, D); scale, bias 0-dim; ids (b_r,), (n_r,) or None."""
    return _Siglip.apply(spec, x, y, scale, bias, xid, yid)
