"""`gather` strategy: all-gather the text features, each rank computes its own b x B stripe.

Rank r holds b_r pairs (sizes may differ; B = sum b_r; W ranks). It gathers every rank's text
features y (B, D) and meets its own images x_r with all of them, block by block through the
kernels (the stripe is split at this rank's diagonal block; each kernel tiles internally, so the
b x B logits never exist at once). Every pair (i, j) is computed by exactly one rank: the owner of
image i.

CLIP. The stripe gives rank r the full row log-sum-exp of its images and a partial column
log-sum-exp for all B texts; one max-shifted all-reduce (two all-reduces of B floats) completes the
columns, so no second text->image stripe is ever computed. Forward: stats (1 GEMM-sized pass);
backward recomputes the stripe for gradients (3) and sums the text gradients (B, D) over ranks back
to their owners (NCCL: reduce-scatter; gloo: all-reduce and slice).
SigLIP. One forward pass yields loss and gradients (3 passes) and the text gradients are summed back
to their owners in the forward; backward only scales (no communication).

Convention (DESIGN.md): L_r = W/(2B) * [sum_{i in r} (lse_j S_ij - S_ii) + sum_{j in r} (lse_i S_ij
- S_jj)] for CLIP and W/B * sum_{i in r, all j} softplus(-z_ij (S_ij + bias)) for SigLIP, so
mean_r L_r = L. Feature gradients on rank r are W * dL/d(its features). The scale (and bias)
gradient on rank r is its row stripe's share W * sum_{i in r} x_i . dL/dx_i / s: for SigLIP that is
exactly dL_r/ds; for CLIP the split across ranks differs from open_clip's but the mean over ranks
(all that DDP sees) is exactly dL/ds. The upstream gradient must be the same on every rank (true for
`loss.backward()`, a constant multiple, or a GradScaler): each rank scales its own work by it.

Communication per rank (bytes sent, ring cost model; e = feature element size, f = 4 (8 for
float64 inputs) for gradients, l = the kernels' statistics width, 8 with the torch backend):
all-gather (W-1) * bmax * D * e; CLIP adds 2 all-reduces of B*l (forward) and, in the backward, the
text-gradient reduction, B*D*f * (W-1)/W with NCCL's reduce-scatter (2x that with gloo's
all-reduce); SigLIP's text-gradient reduction is the same size, in the forward. Plus 5 int64 per
rank of metadata.
Memory per rank: O(B * D) (the gathered features and the (B, D) text gradients): it grows with W.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._checks import compute_dtype
from ..kernels.base import BlockKernels
from . import _comm
from .local import _no_autocast, clip_diagonal, finish_clip_rows, finish_siglip_rows, replay_siglip_grads


def _stripe(yall: Tensor, lo: int, b: int) -> list[tuple[Tensor, int, bool]]:
    """The column blocks of this rank's stripe: (y block, first column, holds the diagonal)."""
    parts = [(yall[:lo], 0, False), (yall[lo : lo + b], lo, True), (yall[lo + b :], lo + b, False)]
    return [p for p in parts if p[0].shape[0] > 0]


class _GatherClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels, lay: _comm.Layout) -> Tensor:
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s = scale.detach().to(cd)
            yall = _comm.gather_rows(y.contiguous(), lay)
            lo, b = lay.offset(lay.rank), x.shape[0]
            # The kernels may return the statistics wider than cd (see base.py): keep their dtype.
            stats = [(kernels.clip_stats(x, yp, s), c0) for yp, c0, _ in _stripe(yall, lo, b)]
            row_lse = torch.logsumexp(torch.stack([r_ for (r_, _), _ in stats]), dim=0)
            col_part = row_lse.new_empty(lay.total)
            for (_, c_), c0 in stats:
                col_part[c0 : c0 + c_.shape[0]] = c_
            del stats
            col_lse = _comm.all_reduce_lse(col_part, lay)
            diag = clip_diagonal(x, y, s).to(row_lse.dtype)
            weight = lay.world / (2 * lay.total)
            # Subtract the positives term by term (as cross-entropy does), not from a large sum.
            loss = (weight * ((row_lse - diag).sum() + (col_lse[lo : lo + b] - diag).sum())).to(cd)
        ctx.kernels, ctx.lay = kernels, lay
        ctx.save_for_backward(x, yall, scale, row_lse, col_lse)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, yall, scale, row_lse, col_lse = ctx.saved_tensors
        lay: _comm.Layout = ctx.lay
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, g = scale.detach().to(cd), grad.to(cd)
            lo, b = lay.offset(lay.rank), x.shape[0]
            weight = lay.world / (2 * lay.total)
            gx = torch.zeros(b, x.shape[1], dtype=cd, device=x.device)
            gyall = torch.empty(lay.total, x.shape[1], dtype=cd, device=x.device)
            for yp, c0, diag in _stripe(yall, lo, b):
                n = yp.shape[0]
                gxp, gyp = ctx.kernels.clip_grads(x, yp, s, row_lse, col_lse[c0 : c0 + n], weight=weight, diagonal=diag)
                gx += gxp
                gyall[c0 : c0 + n] = gyp
            dy = None
            if lay.y_grad:  # the same on every rank (checked), so every rank joins the reduction
                dy = _comm.reduce_rows(gyall.mul_(g), lay).mul_(s).to(yall.dtype)
            dx, ds = finish_clip_rows(ctx, x, gx, g, s, scale)
        return dx, dy if ctx.needs_input_grad[1] else None, ds, None, None


class _GatherSiglip(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels, lay: _comm.Layout
    ) -> Tensor:
        want = any(ctx.needs_input_grad[:4])
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, beta = scale.detach().to(cd), bias.detach().to(cd)
            yall = _comm.gather_rows(y.contiguous(), lay)
            lo, b = lay.offset(lay.rank), x.shape[0]
            weight = lay.world / lay.total
            loss = torch.zeros((), dtype=cd, device=x.device)
            gx = torch.zeros(b, x.shape[1], dtype=cd, device=x.device) if want else None
            gyall = torch.empty(lay.total, x.shape[1], dtype=cd, device=x.device) if want else None
            gbias = torch.zeros((), dtype=cd, device=x.device)
            for yp, c0, diag in _stripe(yall, lo, b):
                part, gxp, gyp, gbp = kernels.siglip_block(x, yp, s, beta, weight=weight, diagonal=diag, grads=want)
                loss = loss + part
                if want:
                    assert gx is not None and gyall is not None and gxp is not None and gyp is not None
                    gx += gxp
                    gyall[c0 : c0 + yp.shape[0]] = gyp
                    gbias = gbias + gbp
            del yall
            if want:
                assert gx is not None and gyall is not None
                dy = _comm.reduce_rows(gyall, lay).mul_(s).to(y.dtype) if lay.y_grad else gx.new_zeros(0)
                finish_siglip_rows(ctx, x, gx, dy, s, gbias, scale, bias)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*replay_siglip_grads(ctx, grad), None, None)


def clip(x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This rank's CLIP loss L_r over the group's global batch. x, y: (b_r, D); scale: 0-dim."""
    lay = _comm.exchange_layout(x, y, (scale,), kernels, group)
    return _GatherClip.apply(x, y, scale, kernels, lay)


def siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This rank's SigLIP loss L_r over the group's global batch. x, y: (b_r, D); scale, bias: 0-dim."""
    lay = _comm.exchange_layout(x, y, (scale, bias), kernels, group)
    return _GatherSiglip.apply(x, y, scale, bias, kernels, lay)
