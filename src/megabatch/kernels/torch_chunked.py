"""`torch` backend: chunked PyTorch block kernels for any device (the CPU path).

Rows of x are processed `chunk` at a time, so the largest temporary is a (chunk, n) tile of logits
plus one tile-sized buffer; nothing of size b x n ever exists. Features are upcast to the compute
dtype (float32, or float64 for float64 inputs) before each product, so logits of magnitude in the
thousands keep full precision; the log-sum-exp is max-shifted (torch.logsumexp) and the column
statistics are merged across chunks with logaddexp. softplus is evaluated by torch's stable form.
Cost: CLIP stats 1 GEMM, CLIP grads 3 GEMMs, SigLIP 3 GEMMs with grads (1 without).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import compute_dtype
from .base import RowSink

# Largest tile of logits (elements) kept at once. On CPU 256K floats (1 MiB) keep the half-dozen
# elementwise passes over a tile in cache (measured fastest at B=4096..8192, D=64, 2 cores); on a
# GPU 16M floats (64 MiB) amortise the launches.
CPU_TILE_ELEMENTS = 1 << 18
GPU_TILE_ELEMENTS = 1 << 24


class TorchChunkedKernels:
    name = "torch"

    def __init__(self, tile_elements: Optional[int] = None):
        """tile_elements: the largest (rows x n) logit tile; None picks by device (see above)."""
        self.tile_elements = tile_elements

    def supports(self, device: torch.device) -> bool:
        return True

    def _chunk(self, b: int, n: int, device: torch.device) -> int:
        tile = self.tile_elements or (CPU_TILE_ELEMENTS if device.type == "cpu" else GPU_TILE_ELEMENTS)
        return max(16, min(b, tile // max(n, 1)))

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yc = y.to(cd)
        s = scale.to(cd)
        row_lse = torch.empty(b, dtype=torch.float64, device=x.device)
        col_lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            logits = torch.mm(x[i : i + step].to(cd), yc.T).mul_(s)
            row_lse[i : i + step] = _wide_lse(logits, 1)
            col_lse = torch.logaddexp(col_lse, _wide_lse(logits, 0))
            del logits  # free the tile before the next product allocates another
        return row_lse, col_lse

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float, diagonal: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Optional[Tensor], Tensor]:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yc = y.to(cd)
        s = scale.to(cd)
        gx = torch.empty(b, x.shape[1], dtype=cd, device=x.device) if rows is None else None
        gy = torch.zeros(n, y.shape[1], dtype=cd, device=x.device)
        row_hi, row_lo = _split(row_lse, cd)
        col_hi, col_lo = _split(col_lse, cd)
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            xc = x[i : i + step].to(cd)
            logits = torch.mm(xc, yc.T).mul_(s)
            p_col = _exp_minus(logits.clone(), col_hi[None, :], col_lo[None, :])
            g = _exp_minus(logits, row_hi[i : i + step, None], row_lo[i : i + step, None]).add_(p_col)
            del p_col
            if diagonal:
                _sub_diagonal(g, i, n, 2.0)
            g.mul_(weight)
            _rows_out(gx, rows, i, torch.mm(g, yc))
            gy.addmm_(g.T, xc)
            del logits, g
        return gx, gy

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, diagonal: bool, grads: bool,
        rows: Optional[RowSink] = None,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yc = y.to(cd)
        s, beta = scale.to(cd), bias.to(cd)
        loss = torch.zeros((), dtype=cd, device=x.device)
        gx = torch.empty(b, x.shape[1], dtype=cd, device=x.device) if grads and rows is None else None
        gy = torch.zeros(n, y.shape[1], dtype=cd, device=x.device) if grads else None
        gbias = torch.zeros((), dtype=cd, device=x.device) if grads else None
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            xc = x[i : i + step].to(cd)
            logits = torch.mm(xc, yc.T).mul_(s).add_(beta)
            # Every pair as a negative: softplus(S); the positives on the diagonal are then swapped
            # for softplus(-S) and gradient -sigmoid(-S), each computed directly (no 1 - sigmoid).
            d = _diagonal(logits, i, n).clone() if diagonal else None
            terms = F.softplus(logits)
            if d is not None:
                _diagonal(terms, i, n).copy_(F.softplus(-d))
            loss = loss + terms.sum()
            del terms
            if not grads:
                del logits
                continue
            g = torch.sigmoid_(logits)
            if d is not None:
                _diagonal(g, i, n).copy_(torch.sigmoid(-d).neg_())
            g.mul_(weight)
            gbias = gbias + g.sum()
            _rows_out(gx, rows, i, torch.mm(g, yc))
            gy.addmm_(g.T, xc)
            del logits, g
        return loss * weight, gx, gy, gbias


def _rows_out(gx: Optional[Tensor], rows: Optional[RowSink], r0: int, chunk: Tensor) -> None:
    """Finished rows r0.. of gx: stored into gx, or handed to the caller's sink."""
    if rows is None:
        assert gx is not None
        gx[r0 : r0 + chunk.shape[0]] = chunk
    else:
        rows(r0, chunk)


def _wide_lse(logits: Tensor, dim: int) -> Tensor:
    """log-sum-exp of a tile along `dim`, returned in float64.

    The max and the shifted sum are exact-ish in the tile's dtype; adding them in float64 keeps the
    result's full precision near the max, which the gradient pass needs (see _exp_minus)."""
    m = logits.amax(dim).clamp_min(torch.finfo(logits.dtype).min)  # an all -inf row would give NaN
    total = torch.exp(logits - m.unsqueeze(dim)).sum(dim)
    return m.double() + total.double().log()


def _split(lse: Tensor, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float64 vector as hi + lo in the compute dtype."""
    hi = lse.to(cd)
    return hi, (lse - hi.double()).to(cd)


def _exp_minus(logits: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """exp(S - lse) in place with lse = hi + lo. S - hi is exact where S is near lse (the entries
    that matter: a softmax weight near 1), so the weights keep full relative precision even when
    |S| is large, as in plain log_softmax."""
    return logits.sub_(hi).sub_(lo).exp_()


def _diagonal(tile: Tensor, row0: int, n: int) -> Tensor:
    """Entries (r, row0 + r) of a tile holding rows row0.. of the block: the positives it contains."""
    rows = tile.shape[0]
    lo, hi = row0, min(row0 + rows, n)
    if hi <= lo:
        return tile.new_zeros(0)
    return torch.diagonal(tile[: hi - lo, lo:hi])


def _sub_diagonal(tile: Tensor, row0: int, n: int, value: float) -> None:
    rows = tile.shape[0]
    lo, hi = row0, min(row0 + rows, n)
    if hi > lo:
        torch.diagonal(tile[: hi - lo, lo:hi]).sub_(value)
