"""`dense` backend: materialises the whole (b, n) block of logits. A baseline and a test oracle for
the block contract (see base.py), written with different formulas from the chunked backend (a dense
positive mask, log-sigmoid on the full matrix, the log-sum-exp rounded once in float64); never chosen
by backend="auto". Memory O(b * n).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import compute_dtype
from .base import BlockGrads, ClipStats, Positives, RowSink, SiglipBlock, Target


def _logits(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    cd = compute_dtype(x.dtype)
    return (scale.to(cd) * x.to(cd)) @ y.to(cd).T


def _mask(pos: Optional[Positives], b: int, n: int, like: Tensor) -> Tensor:
    """(b, n) float mask of the positive pairs."""
    if pos is None:
        return torch.zeros(b, n, dtype=like.dtype, device=like.device)
    if pos.by_ids:
        assert pos.image_ids is not None and pos.text_ids is not None
        return (pos.image_ids[:, None] == pos.text_ids[None, :]).to(like.dtype)
    i = torch.arange(b, device=like.device)[:, None]
    j = torch.arange(n, device=like.device)[None, :]
    return ((j - i == pos.offset) & (i < pos.count)).to(like.dtype)


def _lse(logits: Tensor, dim: int) -> Tensor:
    """log-sum-exp in float64 from a max-shifted sum in the logits' dtype (rounded once, at the end)."""
    m = logits.amax(dim, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    return (m.double() + torch.exp(logits - m).sum(dim, keepdim=True).double().log()).squeeze(dim)


def _softmax_from(logits: Tensor, lse: Tensor) -> Tensor:
    """exp(S - lse) with lse float64 (may be +inf): S - hi exact near the max, then the low part."""
    hi = lse.to(logits.dtype)
    lo = torch.nan_to_num((lse - hi.double()).to(logits.dtype), nan=0.0)
    return torch.exp((logits - hi) - lo)


class DenseKernels:
    name = "dense"

    def supports(self, device: torch.device) -> bool:
        return True

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor, pos: Optional[Positives]) -> ClipStats:
        logits = _logits(x, y, scale)
        if pos is None:
            return ClipStats(_lse(logits, 1), _lse(logits, 0), None, None)
        picked = (logits * _mask(pos, *logits.shape, logits)).double()
        return ClipStats(_lse(logits, 1), _lse(logits, 0), picked.sum(1), picked.sum(0))

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float,
        pos: Optional[Positives], targets: tuple[Target, Target] = (1.0, 1.0), rows: Optional[RowSink] = None,
    ) -> BlockGrads:
        logits = _logits(x, y, scale)
        cd = logits.dtype
        rt, ct = (t.to(cd) if isinstance(t, Tensor) else torch.tensor(t, dtype=cd) for t in targets)
        target = rt.reshape(-1, 1) + ct.reshape(1, -1)
        g = _softmax_from(logits, row_lse[:, None]) + _softmax_from(logits, col_lse[None, :])
        g = weight * (g - _mask(pos, *logits.shape, logits) * target)
        return BlockGrads(_hand_over(g @ y.to(cd), rows), g.T @ x.to(cd))

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, pos: Optional[Positives],
        grads: bool, rows: Optional[RowSink] = None,
    ) -> SiglipBlock:
        logits = _logits(x, y, scale) + bias.to(compute_dtype(x.dtype))
        z = 2.0 * _mask(pos, *logits.shape, logits) - 1.0
        loss = -weight * F.logsigmoid(z * logits).sum()
        if not grads:
            return SiglipBlock(loss, None, None, None)
        g = -weight * z * torch.sigmoid(-z * logits)
        cd = logits.dtype
        return SiglipBlock(loss, _hand_over(g @ y.to(cd), rows), g.T @ x.to(cd), g.sum())


def _hand_over(gx: Tensor, rows: Optional[RowSink]) -> Optional[Tensor]:
    """gx itself, or (with a sink) all of it as one finished chunk and None."""
    if rows is None:
        return gx
    rows(0, gx)
    return None
