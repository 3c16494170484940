"""`ring` strategy: text blocks travel round the ring of ranks; memory O(b * D) whatever W.

Rank r keeps its images x_r. At step t = 0..W-1 it holds the text block y_q of rank q = r - t
(mod W) and meets x_r with it through the kernels, while the block moves on to rank r + 1 and the
next one arrives from rank r - 1 (async isend/irecv posted before the compute, waited after it).
A block carries an *accumulator* for its owner (CLIP's partial column log-sum-exp, or the partial
text gradient), which follows it one hop behind: what rank r adds to y_q's accumulator at step t
is sent at step t + 1, and after visiting every rank the complete accumulator takes one final hop
home (the last rank holding y_q is q - 1). Sizes may differ per rank: every receiver knows the
incoming block's size from the metadata exchanged up front. Each pair (i, j) is computed once per
pass, by the owner of image i.

CLIP. Forward: the stats pass (1 GEMM-sized pass); the column (max, sum-exp) partials travel as a
log-sum-exp of b_q floats with the block, so no text->image stripe is ever computed. Backward: the
blocks travel again, now with their column log-sum-exp, and the text gradients travel back home as
the accumulator (3 passes).
SigLIP. One ring in the forward yields loss and all gradients (3 passes), the text gradients
travelling home as the accumulator; backward only scales (no communication).

Convention: as for `gather` (see gather.py): mean_r L_r = L, feature gradients W * dL/d(features),
scale/bias gradient = this rank's row-stripe share (exactly dL_r/ds for SigLIP; for CLIP the mean
over ranks is exact). The upstream gradient must be the same on every rank.

Communication per rank (bytes sent; e = feature element size, f = 4 (8 for float64 inputs) for
gradients, l = the kernels' statistics width (the torch backend gives float64 log-sum-exps: 8),
b_q = the blocks passing through): CLIP forward (W-1) blocks of b_q*D*e + W stats of b_q*l;
CLIP backward (W-1) blocks of b_q*(D*e + l) + W text gradients of b_q*D*f. SigLIP (forward only):
(W-1) blocks of b_q*D*e + W text gradients of b_q*D*f. About an all-gather plus a reduce-scatter,
spread over W steps that overlap the compute. Plus 5 int64 per rank of metadata.
Memory per rank: O(bmax * D), independent of W (W >= 3): the block being computed on, the next one
arriving, the accumulator received and the one being sent, and this step's contribution.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .._checks import compute_dtype
from ..kernels.base import BlockKernels
from . import _comm
from .local import _no_autocast, clip_diagonal, finish_clip_rows, finish_siglip_rows, replay_siglip_grads

# visit(q, block) -> this rank's contribution to block q's accumulator (None when none travels).
Visit = Callable[[int, list[Tensor]], Optional[Tensor]]
_TAGS = 8  # tags per step: block tensors use 0.., the accumulator the last one


def circulate(
    lay: _comm.Layout,
    block: Sequence[Tensor],
    visit: Visit,
    combine: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> Optional[Tensor]:
    """Pass this rank's `block` (tensors with b_r rows) round the ring, calling `visit` on every block.

    combine(acc, part): merges this rank's contribution `part` into the received accumulator `acc`
    in place and returns it (_add_into, _lse_into); visit then returns a (b_q, ...) contribution for
    block q, of the same trailing shape and dtype for every block. Returns this rank's completed
    accumulator (b_r, ...), or None when combine is None.
    """
    world, r = lay.world, lay.rank
    cur, src = [t.contiguous() for t in block], r
    done: Optional[Tensor] = None  # accumulator completed at the previous step, for rank r + 1
    for t in range(world):
        sends, recvs, nxt, acc_in = [], [], cur, None
        if t < world - 1:  # the block moves on while we compute on it
            nsrc = (r - t - 1) % world
            nxt = [u.new_empty(lay.sizes[nsrc], *u.shape[1:]) for u in cur]
            sends += [(u, r + 1, _TAGS * t + k) for k, u in enumerate(cur)]
            recvs += [(u, r - 1, _TAGS * t + k) for k, u in enumerate(nxt)]
        if t > 0 and combine is not None:  # the accumulator of the block we hold follows it
            assert done is not None
            acc_in = done.new_empty(lay.sizes[src], *done.shape[1:])
            sends.append((done, r + 1, _TAGS * t + _TAGS - 1))
            recvs.append((acc_in, r - 1, _TAGS * t + _TAGS - 1))
        works = _comm.start_p2p(sends, recvs, lay)
        part = visit(src, cur)
        _comm.wait(works)
        if combine is not None:
            assert part is not None
            done = part.contiguous() if acc_in is None else combine(acc_in, part)
        del part, acc_in, works  # no longer held while the next block is computed on
        cur, src = nxt, (r - t - 1) % world
    if combine is None or world == 1:
        return done
    assert done is not None
    home = done.new_empty(lay.sizes[r], *done.shape[1:])
    _comm.wait(_comm.start_p2p([(done, r + 1, _TAGS * world)], [(home, r - 1, _TAGS * world)], lay))
    return home


def _add_into(acc: Tensor, part: Tensor) -> Tensor:
    return acc.add_(part)


def _lse_into(acc: Tensor, part: Tensor) -> Tensor:
    return torch.logaddexp(acc, part, out=acc)


class _RingClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels, lay: _comm.Layout) -> Tensor:
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s = scale.detach().to(cd)
            row_lse: Optional[Tensor] = None  # in the dtype the kernels give (maybe wider than cd)

            def visit(q: int, blk: list[Tensor]) -> Tensor:
                nonlocal row_lse
                r_, c_ = kernels.clip_stats(x, blk[0], s)
                row_lse = r_ if row_lse is None else torch.logaddexp(row_lse, r_)
                return c_

            col_lse = circulate(lay, [y], visit, combine=_lse_into)
            assert col_lse is not None and row_lse is not None
            diag = clip_diagonal(x, y, s).to(row_lse.dtype)
            # Subtract the positives term by term (as cross-entropy does), not from a large sum.
            weight = lay.world / (2 * lay.total)
            loss = (weight * ((row_lse - diag).sum() + (col_lse - diag).sum())).to(cd)
        ctx.kernels, ctx.lay = kernels, lay
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        lay: _comm.Layout = ctx.lay
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, g = scale.detach().to(cd), grad.to(cd)
            weight = lay.world / (2 * lay.total)
            gx = torch.zeros(x.shape[0], x.shape[1], dtype=cd, device=x.device)

            def visit(q: int, blk: list[Tensor]) -> Optional[Tensor]:
                gxp, gyp = ctx.kernels.clip_grads(
                    x, blk[0], s, row_lse, blk[1], weight=weight, diagonal=q == lay.rank
                )
                gx.add_(gxp)
                return gyp.mul_(g) if lay.y_grad else None

            gy = circulate(lay, [y, col_lse], visit, combine=_add_into if lay.y_grad else None)
            dx, ds = finish_clip_rows(ctx, x, gx, g, s, scale)
            dy = gy.mul_(s).to(y.dtype) if gy is not None and ctx.needs_input_grad[1] else None
        return dx, dy, ds, None, None


class _RingSiglip(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels, lay: _comm.Layout
    ) -> Tensor:
        want = any(ctx.needs_input_grad[:4])
        with _no_autocast(x):
            cd = compute_dtype(x.dtype)
            s, beta = scale.detach().to(cd), bias.detach().to(cd)
            weight = lay.world / lay.total
            loss = torch.zeros((), dtype=cd, device=x.device)
            gx = torch.zeros(x.shape[0], x.shape[1], dtype=cd, device=x.device)
            gbias = torch.zeros((), dtype=cd, device=x.device)

            def visit(q: int, blk: list[Tensor]) -> Optional[Tensor]:
                nonlocal loss, gbias
                part, gxp, gyp, gbp = kernels.siglip_block(
                    x, blk[0], s, beta, weight=weight, diagonal=q == lay.rank, grads=want
                )
                loss = loss + part
                if not want:
                    return None
                assert gxp is not None and gbp is not None
                gx.add_(gxp)
                gbias = gbias + gbp
                return gyp if lay.y_grad else None

            gy = circulate(lay, [y], visit, combine=_add_into if want and lay.y_grad else None)
            if want:
                dy = gy.mul_(s).to(y.dtype) if gy is not None else gx.new_zeros(0)
                finish_siglip_rows(ctx, x, gx, dy, s, gbias, scale, bias)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*replay_siglip_grads(ctx, grad), None, None)


def clip(x: Tensor, y: Tensor, scale: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This rank's CLIP loss L_r over the group's global batch. x, y: (b_r, D); scale: 0-dim."""
    lay = _comm.exchange_layout(x, y, (scale,), kernels, group)
    return _RingClip.apply(x, y, scale, kernels, lay)


def siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kernels: BlockKernels, group: Any = None) -> Tensor:
    """This rank's SigLIP loss L_r over the group's global batch. x, y: (b_r, D); scale, bias: 0-dim."""
    lay = _comm.exchange_layout(x, y, (scale, bias), kernels, group)
    return _RingSiglip.apply(x, y, scale, bias, kernels, lay)
