"""CLIP's softmax loss over any strategy and backend: one autograd.Function.

Definitions (docs/design.md; S = s * x @ y.T over the global batch, P(i) the positives of row i):
  row i (if P(i) is non-empty):    lse_j S_ij - mean_{j in P(i)} S_ij
  column j (if it has positives):  lse_i S_ij - mean_{i in P'(j)} S_ij
  L = w_r * sum(rows) + w_c * sum(columns), w_r = 1/(2R), w_c = 1/(2C) for directions="both"
  (R, C: rows, columns of the global batch with a positive); "image_to_text": w_r = 1/R, w_c = 0;
  "text_to_image": w_r = 0, w_c = 1/C. Rows without a positive stay in every column's normaliser.
  dL/dS_ij = w_r [c_i>0] (P_row_ij - pos_ij / c_i) + w_c [k_j>0] (P_col_ij - pos_ij / k_j).

Forward: the stats pass (1 GEMM-sized pass) gives each row's and column's log-sum-exp and the sum of
its positive logits from the same tiles, so lse - mean(positive) is as exact as plain cross-entropy;
the column statistics travel with their blocks. Backward: the blocks travel again with their
column statistics (shifted by the column weight, +inf where a column takes no part) and the text
gradients come home as the accumulator (3 passes). The kernels work unnormalised: the weights
(device tensors when R, C come from ids) are applied when the rows and columns are finished.

Distributed convention (docs/design.md): rank r returns L_r with mean_r L_r = L, its feature gradients are
W * dL/d(its features), and its scale gradient is its row stripe's share W * sum_i x_i . dL/dx_i / s
(the mean over ranks is exactly dL/ds). The upstream gradient must be the same on every rank.
A global batch without any positive pair gives NaN (R = 0): checking would sync with the device.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._numerics import RowFinisher, compute_dtype, no_autocast, scalar_grad
from ..kernels.base import Target
from ..strategies import Block, Strategy
from .options import Features, LossSpec
from .positives import block_positives, id_counts

DIRECTIONS = {"both": 0, "image_to_text": 1, "text_to_image": 2}

Weight = Union[float, Tensor]


def _weights(direction: int, rows: Weight, cols: Weight) -> tuple[Weight, Weight]:
    """(w_r, w_c) for R = rows and C = columns with a positive (ints, or device tensors with ids)."""
    def inv(k: Weight) -> Weight:
        return 1.0 / k if isinstance(k, Tensor) else (1.0 / k if k else math.inf)

    if direction == DIRECTIONS["image_to_text"]:
        return inv(rows), 0.0
    if direction == DIRECTIONS["text_to_image"]:
        return 0.0, inv(cols)
    half = 0.5
    return half * inv(rows), half * inv(cols)


def _shifted(lse: Tensor, cnt: Tensor, factor: Weight) -> Tensor:
    """lse - log(factor) where the row (column) has a positive and factor > 0, else +inf (no part)."""
    if isinstance(factor, float):
        return torch.where(cnt > 0, lse, math.inf) if factor == 1.0 else torch.full_like(lse, math.inf)
    return torch.where((cnt > 0) & (factor > 0), lse - torch.log(factor), math.inf)


class ClipSaved(NamedTuple):
    """What the backward pass needs from the forward: this rank's statistics, all local-sized
    (row_lse, row_cnt (b,), col_lse, col_cnt (n,), float64) and the weights (w_r, w_c)."""

    row_lse: Tensor
    col_lse: Tensor
    row_cnt: Tensor
    col_cnt: Tensor
    weights: tuple[Weight, Weight]

    def packed(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """As tensors only (the custom ops' outputs): the statistics, then the weights as (2,) float64."""
        weights = torch.stack([torch.as_tensor(w, dtype=torch.float64, device=device) for w in self.weights])
        return self.row_lse, self.col_lse, self.row_cnt, self.col_cnt, weights

    @staticmethod
    def unpacked(row_lse: Tensor, col_lse: Tensor, row_cnt: Tensor, col_cnt: Tensor, weights: Tensor) -> "ClipSaved":
        """The inverse of `packed`."""
        return ClipSaved(row_lse, col_lse, row_cnt, col_cnt, (weights[0], weights[1]))


class ClipGrads(NamedTuple):
    """clip_backward's result: dx, dy, dscale, each None when `needs` says it is not wanted."""

    dx: Optional[Tensor]
    dy: Optional[Tensor]
    dscale: Optional[Tensor]


def clip_forward(spec: LossSpec, f: Features, scale: Tensor) -> tuple[Tensor, ClipSaved, Strategy]:
    """This rank's loss L_r (compute dtype, 0-dim), what `clip_backward` needs, and the strategy it
    started (`spec.start`), which the backward goes on with (the eager road keeps it; the compiled
    one resumes it from its layout)."""
    strat = spec.start(f.x, f.y, (scale,))
    kernels, direction = spec.kernels, spec.direction
    x, y, xid, yid = f
    lay = strat.lay
    b, n = x.shape[0], y.shape[0]
    ids = xid is not None
    with no_autocast(x):
        cd = compute_dtype(x.dtype)
        s = scale.detach().to(cd)
        f64 = dict(dtype=torch.float64, device=x.device)
        row_lse = torch.full((b,), -math.inf, **f64)
        row_pos = torch.zeros(b, **f64)
        row_cnt = torch.zeros(b, **f64) if ids else None

        def visit(blk: Block) -> list[Tensor]:
            nonlocal row_lse
            col_lse = torch.full((blk.n,), -math.inf, **f64)
            col_sums = torch.zeros(blk.n, 2, **f64) if ids else None  # positive count, logit sum
            if b and blk.n:
                st = kernels.clip_stats(x, blk.tensors[0], s, block_positives(strat, b, xid, blk))
                row_lse = torch.logaddexp(row_lse, st.row_lse.to(torch.float64))
                col_lse = st.col_lse.to(torch.float64)
                if st.row_pos is not None:
                    row_pos.add_(st.row_pos)
                if ids:
                    assert row_cnt is not None and col_sums is not None and xid is not None
                    rc, cc = id_counts(xid, blk.tensors[1])
                    row_cnt.add_(rc)
                    col_sums[:, 0] = cc
                    if st.col_pos is not None:
                        col_sums[:, 1] = st.col_pos
            return [col_lse] if col_sums is None else [col_lse, col_sums]

        fixed = [y] if yid is None else [y, yid]
        accs = ["lse", "sum"] if ids else ["lse"]
        col = strat.circulate(fixed, [], visit, accs)
        col_lse = col[0]
        if ids:
            assert row_cnt is not None
            col_cnt, col_pos = col[1][:, 0], col[1][:, 1]
            counts = strat.all_sum(torch.stack([(row_cnt > 0).sum(), (col_cnt > 0).sum()]).to(torch.float64))
            rows_with, cols_with = counts[0], counts[1]
        else:  # index positives: row i and column i of this rank, i < m, one positive each
            m = min(b, n)
            row_cnt = (torch.arange(b, device=x.device) < m).to(torch.float64)
            col_cnt = (torch.arange(n, device=x.device) < m).to(torch.float64)
            col_pos = torch.zeros(n, **f64)
            col_pos[:m] = row_pos[:m]
            rows_with = cols_with = sum(min(p, q) for p, q in zip(lay.sizes, lay.tsizes))
        w_r, w_c = _weights(direction, rows_with, cols_with)
        # Term by term, lse - mean(positive logits), both from the same tiles: exact near 0.
        loss = torch.zeros((), **f64)
        if direction != DIRECTIONS["text_to_image"]:
            has = row_cnt > 0
            loss = loss + w_r * torch.where(has, row_lse - row_pos / row_cnt.clamp_min(1), 0.0).sum()
        if direction != DIRECTIONS["image_to_text"]:
            has = col_cnt > 0
            loss = loss + w_c * torch.where(has, col_lse - col_pos / col_cnt.clamp_min(1), 0.0).sum()
        loss = (lay.world * loss).to(cd)
    return loss, ClipSaved(row_lse, col_lse, row_cnt, col_cnt, (w_r, w_c)), strat


def clip_backward(spec: LossSpec, strat: Strategy, f: Features, scale: Tensor, saved: ClipSaved, grad: Tensor,
                  needs: Sequence[bool]) -> ClipGrads:
    """(dx, dy, dscale) for the upstream `grad` (None where `needs` (x, y, scale) says not wanted),
    over the strategy `clip_forward` started."""
    row_lse, col_lse, row_cnt, col_cnt = saved.row_lse, saved.col_lse, saved.row_cnt, saved.col_cnt
    kernels, direction = spec.kernels, spec.direction
    x, y, xid, yid = f
    lay = strat.lay
    b, ids = x.shape[0], xid is not None
    with no_autocast(x):
        cd = compute_dtype(x.dtype)
        s, g = scale.detach().to(cd), grad.to(cd)
        # The kernels see G / alpha with alpha = max(w_r, w_c), so |G| <= 2 (fp16 scratch); the
        # row and column factors fr, fc <= 1 shift the log-sum-exps (+inf: that side takes no
        # part) and scale the positive targets.
        w_r, w_c = (torch.as_tensor(w, dtype=torch.float64, device=x.device) for w in saved.weights)
        alpha = torch.maximum(w_r, w_c)
        if ids:
            fr, fc = w_r / alpha, w_c / alpha
            rt: Target = torch.where(row_cnt > 0, fr / row_cnt.clamp_min(1), 0.0)
            ct: Target = torch.where(col_cnt > 0, fc / col_cnt.clamp_min(1), 0.0)
        else:  # R = C: the factors are 0 or 1
            fr = 1.0 if direction != DIRECTIONS["text_to_image"] else 0.0
            fc = 1.0 if direction != DIRECTIONS["image_to_text"] else 0.0
            rt, ct = fr, fc
        row_shift, col_shift = _shifted(row_lse, row_cnt, fr), _shifted(col_lse, col_cnt, fc)
        mult = g * lay.world * alpha.to(cd)
        fin = RowFinisher(x, mult * s, needs[0])
        gx = None if strat.visits_once else torch.zeros(b, x.shape[1], dtype=cd, device=x.device)

        def visit(blk: Block) -> list[Tensor]:
            cols = blk.tensors[1 + ids]
            if not (b and blk.n):
                return [torch.zeros(blk.n, x.shape[1], dtype=cd, device=x.device)] if lay.y_grad else []
            pos = block_positives(strat, b, xid, blk)
            part = kernels.clip_grads(
                x, blk.tensors[0], s, row_shift, cols, weight=1.0, pos=pos,
                targets=(rt, blk.tensors[2 + ids]) if ids else (rt, ct), rows=fin if gx is None else None,
            )
            if gx is not None:
                assert part.gx is not None
                gx.add_(part.gx)
            return [part.gy] if lay.y_grad else []

        fixed = [y] if yid is None else [y, yid]
        travel = [col_shift] + ([ct] if ids else [])
        home = strat.circulate(fixed, travel, visit, ["sum"] if lay.y_grad else [])
        strat.release()
        if gx is not None:
            fin.whole(gx)
        dy = home[0].mul_(mult * s).to(y.dtype) if home and needs[1] else None
        ds = scalar_grad((scale.shape, scale.dtype), mult * fin.dot) if needs[2] else None
    return ClipGrads(fin.dx, dy, ds)


class _Clip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, xid: Optional[Tensor],
                yid: Optional[Tensor]) -> Tensor:
        loss, saved, strat = clip_forward(spec, Features(x, y, xid, yid), scale)
        ctx.spec, ctx.strat, ctx.weights = spec, strat, saved.weights
        ctx.save_for_backward(x, y, scale, xid, yid, saved.row_lse, saved.col_lse, saved.row_cnt, saved.col_cnt)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, y, scale, xid, yid, *stats = ctx.saved_tensors
        grads = clip_backward(ctx.spec, ctx.strat, Features(x, y, xid, yid), scale, ClipSaved(*stats, ctx.weights),
                              grad, ctx.needs_input_grad[1:4])
        return (None, *grads, None, None)


def clip(spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, xid: Optional[Tensor] = None,
         yid: Optional[Tensor] = None) -> Tensor:
    """This rank's CLIP loss L_r, the eager road (losses.ops.clip is the compiled one, same arguments).
    x (b_r, D), y (n_r, D); scale 0-dim; ids (b_r,), (n_r,) or None."""
    return _Clip.apply(spec, x, y, scale, xid, yid)
