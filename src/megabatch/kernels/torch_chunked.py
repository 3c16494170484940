"""`torch` backend: chunked PyTorch block kernels for any device (the CPU path).

Rows of x are processed `chunk` at a time, so the largest temporary is a (chunk, n) tile of logits
plus one tile-sized buffer; nothing of size b x n ever exists. Features are upcast to the compute
dtype (float32, or float64 for float64 inputs) before each product, so logits of magnitude in the
thousands keep full precision; the row of x is multiplied by s before the product (as plain
`s * x @ y.T` does). The log-sum-exp is max-shifted and the column statistics are merged across
chunks with logaddexp in float64. softplus is evaluated by torch's stable form.
Positives: index positives are a diagonal band of the tile (a strided view: no mask). Ids: on the
CPU the positive pairs are listed once per call (sort and binary search, O((b + n) log n + pairs);
their number is read on the host, which on a CPU is no device sync), so a tile touches only its
positive entries (a gather / scatter of a few values); on other devices, or when the pairs are too
many to list (more than SPARSE_LIMIT per row or column on average), or under torch.compile, every
tile compares the ids itself (a (chunk, n) bool tile, never b x n) with no host read at all.
Cost: CLIP stats 1 GEMM, CLIP grads 3 GEMMs, SigLIP 3 GEMMs with grads (1 without).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import compute_dtype
from .base import BlockGrads, ClipStats, Positives, RowSink, SiglipBlock, Target

# Largest tile of logits (elements) kept at once. On CPU 256K floats (1 MiB) keep the half-dozen
# elementwise passes over a tile in cache (measured fastest at B=4096..8192, D=64, 2 cores); on a
# GPU 16M floats (64 MiB) amortise the launches.
CPU_TILE_ELEMENTS = 1 << 18
GPU_TILE_ELEMENTS = 1 << 24
# Listed positive pairs (ids, CPU) at most SPARSE_LIMIT * (b + n); beyond, tiles compare the ids.
SPARSE_LIMIT = 64


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

    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor, pos: Optional[Positives]) -> ClipStats:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yt = y.to(cd).T
        s = scale.to(cd)
        row_lse = torch.empty(b, dtype=torch.float64, device=x.device)
        col_lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
        row_pos = col_pos = None
        if pos is not None:
            row_pos = torch.zeros(b, dtype=torch.float64, device=x.device)
            col_pos = torch.zeros(n, dtype=torch.float64, device=x.device)
        ids = _IdPairs(pos, b, n) if pos is not None and pos.by_ids else None
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            logits = torch.mm(x[i : i + step].to(cd) * s, yt)
            if pos is not None:
                assert row_pos is not None and col_pos is not None
                _positive_sums(logits, pos, ids, i, row_pos, col_pos)
            row_lse[i : i + step] = _wide_lse(logits, 1)
            col_lse = torch.logaddexp(col_lse, _wide_lse(logits, 0))
            del logits  # free the tile before the next product allocates another
        return ClipStats(row_lse, col_lse, row_pos, col_pos)

    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float,
        pos: Optional[Positives], targets: tuple[Target, Target] = (1.0, 1.0), rows: Optional[RowSink] = None,
    ) -> BlockGrads:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yc = y.to(cd)
        s = scale.to(cd)
        gx = torch.empty(b, x.shape[1], dtype=cd, device=x.device) if rows is None else None
        gy = torch.zeros(n, y.shape[1], dtype=cd, device=x.device)
        row_hi, row_lo = _split(row_lse, cd)
        col_hi, col_lo = _split(col_lse, cd)
        rt, ct = (t.to(cd) if isinstance(t, Tensor) else t for t in targets)
        ids = _IdPairs(pos, b, n) if pos is not None and pos.by_ids else None
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            xc = x[i : i + step].to(cd)
            logits = torch.mm(xc * s, yc.T)
            p_col = _exp_minus(torch.sub(logits, col_hi[None, :]), col_lo[None, :])
            g = _exp_minus(logits.sub_(row_hi[i : i + step, None]), row_lo[i : i + step, None]).add_(p_col)
            del p_col
            if pos is not None:
                _sub_positives(g, pos, ids, i, rt, ct)
            gxc = torch.mm(g, yc)
            if weight != 1.0:
                gxc.mul_(weight)
            _rows_out(gx, rows, i, gxc)
            gy.addmm_(g.T, xc, alpha=weight)
            del logits, g
        return BlockGrads(gx, gy)

    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, pos: Optional[Positives],
        grads: bool, rows: Optional[RowSink] = None,
    ) -> SiglipBlock:
        cd = compute_dtype(x.dtype)
        b, n = x.shape[0], y.shape[0]
        yc = y.to(cd)
        s, beta = scale.to(cd), bias.to(cd)
        loss = torch.zeros((), dtype=cd, device=x.device)
        gx = torch.empty(b, x.shape[1], dtype=cd, device=x.device) if grads and rows is None else None
        gy = torch.zeros(n, y.shape[1], dtype=cd, device=x.device) if grads else None
        gbias = torch.zeros((), dtype=cd, device=x.device) if grads else None
        ids = _IdPairs(pos, b, n) if pos is not None and pos.by_ids else None
        step = self._chunk(b, n, x.device)
        for i in range(0, b, step):
            xc = x[i : i + step].to(cd)
            logits = torch.mm(xc * s, yc.T).add_(beta)
            # Every pair as a negative: softplus(S); the positives are then swapped for softplus(-S)
            # and gradient -sigmoid(-S), each computed directly (no 1 - sigmoid, no softplus(S) - S):
            # listed positives by a gather and a scatter, index positives on the diagonal band, and
            # otherwise (ids on a GPU) by flipping the sign of the positives' logits in place.
            eq = flat = None
            d: Optional[Tensor] = None
            if pos is not None and pos.by_ids:
                assert ids is not None
                flat = ids.flat(i, logits.shape[0], n)
                if flat is None:
                    eq = _id_tile(pos, i, logits.shape[0])
                    logits.addcmul_(eq, logits, value=-2.0)  # u = -z (S + bias)
                else:
                    d = logits.view(-1)[flat]
            elif pos is not None:
                d = _band(logits, pos, i).clone()
            terms = F.softplus(logits)
            if d is not None:
                _put(terms, pos, flat, i, F.softplus(-d))
            loss = loss + terms.sum()
            del terms
            if not grads:
                del logits
                continue
            g = torch.sigmoid_(logits)  # sigmoid(u); G = -z sigmoid(u)
            if eq is not None:
                g.addcmul_(eq, g, value=-2.0)
            elif d is not None:
                _put(g, pos, flat, i, torch.sigmoid(-d).neg_())
            gbias = gbias + g.sum()
            gxc = torch.mm(g, yc)
            _rows_out(gx, rows, i, gxc.mul_(weight))
            gy.addmm_(g.T, xc, alpha=weight)
            del logits, g
        if gbias is not None:
            gbias = gbias * weight
        return SiglipBlock(loss * weight, gx, gy, gbias)


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
    result's full precision near the max, which the gradient pass needs (see _exp_minus), and makes
    lse - (a positive logit of the same tile) exact where that logit is the max."""
    m = logits.amax(dim).clamp_min(torch.finfo(logits.dtype).min)  # an all -inf row would give NaN
    total = torch.exp(logits - m.unsqueeze(dim)).sum(dim)
    return m.double() + total.double().log()


def _split(lse: Tensor, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float64 vector as hi + lo in the compute dtype (+inf stays +inf in hi, 0 in lo)."""
    hi = lse.to(cd)
    lo = (lse - hi.double()).to(cd)
    return hi, torch.nan_to_num(lo, nan=0.0)


def _exp_minus(diff_hi: Tensor, lo: Tensor) -> Tensor:
    """exp(S - lse) in place, given S - hi with lse = hi + lo. S - hi is exact where S is near lse
    (the entries that matter: a softmax weight near 1), so the weights keep full relative precision
    even when |S| is large, as in plain log_softmax."""
    return diff_hi.sub_(lo).exp_()


def _band(tile: Tensor, pos: Positives, r0: int) -> Tensor:
    """The index positives inside a tile holding rows r0.. of the block (a strided view)."""
    rows, n = tile.shape
    lo, hi = pos.band(r0, rows, n)
    if hi <= lo:
        return tile.new_zeros(0)
    return torch.diagonal(tile[lo - r0 : hi - r0, lo + pos.offset : hi + pos.offset])


def _id_tile(pos: Positives, r0: int, rows: int) -> Tensor:
    """(rows, n) bool: image_ids[r0 + r] == text_ids[c], for one tile of rows."""
    assert pos.image_ids is not None and pos.text_ids is not None
    return pos.image_ids[r0 : r0 + rows, None] == pos.text_ids[None, :]


class _IdPairs:
    """Positives by ids, prepared once per kernel call: on the CPU the list of positive pairs, in row
    order (rows, cols and where each row's pairs start); elsewhere, or past SPARSE_LIMIT, nothing
    (the tiles compare the ids themselves)."""

    def __init__(self, pos: Positives, b: int, n: int):
        self.listed = False
        xid, yid = pos.image_ids, pos.text_ids
        assert xid is not None and yid is not None
        if xid.device.type != "cpu" or SPARSE_LIMIT < 0 or torch.compiler.is_compiling():
            return  # traced code (torch.compile) takes the tile-compare path too: no host read to break it
        sorted_y, perm = torch.sort(yid)
        lo = torch.searchsorted(sorted_y, xid)
        count = torch.searchsorted(sorted_y, xid, right=True) - lo
        ends = torch.cumsum(count, 0)
        self.offsets = [0] + ends.tolist()  # a host read of a CPU tensor: no device to sync with
        total = self.offsets[-1]
        if total > SPARSE_LIMIT * (b + n):
            return
        self.rows = torch.repeat_interleave(torch.arange(b), count, output_size=total)
        within = torch.arange(total) - (ends - count)[self.rows]
        self.cols = perm[lo[self.rows] + within]
        self.listed, self.n = True, n

    def pairs(self, r0: int, rows: int) -> Optional[tuple[Tensor, Tensor]]:
        """(rows, cols) of the listed pairs with a row in r0 .. r0 + rows (None: not listed)."""
        if not self.listed:
            return None
        a, z = self.offsets[r0], self.offsets[min(r0 + rows, len(self.offsets) - 1)]
        return self.rows[a:z], self.cols[a:z]

    def flat(self, r0: int, rows: int, n: int) -> Optional[Tensor]:
        """Their flat indices in a (rows, n) tile of rows r0.. (None: not listed)."""
        got = self.pairs(r0, rows)
        return None if got is None else (got[0] - r0) * n + got[1]


def _put(tile: Tensor, pos: Optional[Positives], flat: Optional[Tensor], r0: int, values: Tensor) -> None:
    """Write `values` at the tile's positives: listed (flat indices) or the index band."""
    if flat is not None:
        tile.view(-1)[flat] = values
    else:
        assert pos is not None
        _band(tile, pos, r0).copy_(values)


def _positive_sums(logits: Tensor, pos: Positives, ids: Optional[_IdPairs], r0: int, row_pos: Tensor,
                   col_pos: Tensor) -> None:
    """Add the tile's positive logits to the row and column sums (float64)."""
    rows, n = logits.shape
    if pos.by_ids:
        assert ids is not None
        got = ids.pairs(r0, rows)
        if got is not None:
            r, c = got
            vals = logits.view(-1)[(r - r0) * n + c].double()
            row_pos.index_add_(0, r, vals)
            col_pos.index_add_(0, c, vals)
            return
        picked = torch.where(_id_tile(pos, r0, rows), logits, 0.0)
        row_pos[r0 : r0 + rows] += picked.sum(1, dtype=torch.float64)
        col_pos += picked.sum(0, dtype=torch.float64)
        return
    lo, hi = pos.band(r0, rows, n)
    if hi > lo:
        d = _band(logits, pos, r0).double()
        row_pos[lo:hi] += d
        col_pos[lo + pos.offset : hi + pos.offset] += d


def _sub_positives(g: Tensor, pos: Positives, ids: Optional[_IdPairs], r0: int, rt: Target, ct: Target) -> None:
    """g -= pos * (rt_i + ct_j) on one tile of rows r0.. (targets: floats or (b,) / (n,) tensors)."""
    rows, n = g.shape
    if pos.by_ids:
        assert ids is not None
        got = ids.pairs(r0, rows)
        if got is not None:
            r, c = got
            target = (rt[r] if isinstance(rt, Tensor) else rt) + (ct[c] if isinstance(ct, Tensor) else ct)
            target = target if isinstance(target, Tensor) else torch.full_like(r, target, dtype=g.dtype)
            g.view(-1).index_add_(0, (r - r0) * n + c, target.to(g.dtype), alpha=-1)
            return
        eq = _id_tile(pos, r0, rows)
        constant = sum(float(t) for t in (rt, ct) if not isinstance(t, Tensor))
        if constant:
            g.sub_(eq.to(g.dtype), alpha=constant)
        if isinstance(rt, Tensor):
            g.addcmul_(eq, rt[r0 : r0 + rows, None], value=-1)
        if isinstance(ct, Tensor):
            g.addcmul_(eq, ct[None, :], value=-1)
        return
    lo, hi = pos.band(r0, rows, n)
    if hi <= lo:
        return
    d = _band(g, pos, r0)
    d.sub_(rt[lo:hi] if isinstance(rt, Tensor) else rt)
    d.sub_(ct[lo + pos.offset : hi + pos.offset] if isinstance(ct, Tensor) else ct)
