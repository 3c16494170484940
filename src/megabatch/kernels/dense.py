"""`dense` backend: materialises the whole (b, n) block of logits. A baseline and a test oracle for
the block contract (see base.py), written with different formulas from the chunked backend
(log-softmax and log-sigmoid on the full matrix); never chosen by backend="auto". Memory O(b * n).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import compute_dtype
from .base import RowSink


def _logits(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    cd = compute_dtype(x.dtype)
    return scale.to(cd) * (x.to(cd) @ y.to(cd).T)


def _eye(b: int, n: int, like: Tensor) -> Tensor:
    return torch.eye(b, n, dtype=like.dtype, device=like.device)


class DenseKernels:
    name = "dense"

    def supports(self, device: torch.device) -> bool:
        return True

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        logits = _logits(x, y, scale)
        return torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float, diagonal: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Optional[Tensor], Tensor]:
        logits = _logits(x, y, scale)
        g = torch.exp(logits - row_lse[:, None]) + torch.exp(logits - col_lse[None, :])
        if diagonal:
            g = g - 2.0 * _eye(*g.shape, g)
        g = weight * g
        cd = logits.dtype
        return _hand_over(g @ y.to(cd), rows), g.T @ x.to(cd)

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, diagonal: bool, grads: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        logits = _logits(x, y, scale) + bias.to(compute_dtype(x.dtype))
        z = -torch.ones_like(logits)
        if diagonal:
            z = z + 2.0 * _eye(*z.shape, z)
        loss = -weight * F.logsigmoid(z * logits).sum()
        if not grads:
            return loss, None, None, None
        g = -weight * z * torch.sigmoid(-z * logits)
        cd = logits.dtype
        return loss, _hand_over(g @ y.to(cd), rows), g.T @ x.to(cd), g.sum()


def _hand_over(gx: Tensor, rows: Optional[RowSink]) -> Optional[Tensor]:
    """gx itself, or (with a sink) all of it as one finished chunk and None."""
    if rows is None:
        return gx
    rows(0, gx)
    return None
