"""`triton` backend: the block contract of base.py in fused Triton kernels (CUDA; CPU via the interpreter).

The block (b x n) is cut into super-blocks of at most `super_rows` x `super_cols` pairs, visited on
one stream, rows outer. Per super-block:
  CLIP stats   clip_stats_kernel: logit tiles -> per-tile (max, sumexp) of rows and of columns,
               then lse_merge_kernel folds them into running (b,) and (n,) pairs.      1 GEMM
  CLIP grads   clip_grad_tile_kernel: logit tiles -> G' (input dtype) in a scratch of one
               super-block; grad_gemm_kernel: gx_I += w G' @ y_J, gy_J += w G'.T @ x_I.  3 GEMMs
  SigLIP       siglip_tile_kernel: logit tiles -> loss and sum(G') per program slot, and G' unless
               grads=False; then grad_gemm_kernel as above.                        3 GEMMs (1)
Logits never leave registers. Extra memory: the fp32 gy and gx the contract returns -- or, when
the caller takes finished rows (a RowSink, see base.py), one (super_rows, D) fp32 gx buffer in
place of gx --, one scratch of super_rows x super_cols elements in the input dtype (128 MiB in
bf16 at the default 8192 x 8192: constant in B), and O(b + n) floats. No host sync: scale and
bias are read in-kernel. Offsets are int32 inside a super-block (super_rows * D and
super_rows * super_cols < 2**31). A super-block without edge tiles launches its kernels unmasked
(EVEN).
Compute: float32 accumulation; bf16/fp16 operands on tensor cores; fp32 operands with
`fp32_precision` ("tf32" when torch allows TF32 matmuls, else "tf32x3" ~ fp32 accuracy, or "ieee").
float64 inputs are delegated to the torch backend (Triton has no fast fp64 path): same results.
torch.compile: the losses reach these kernels through torch.library custom ops while dynamo traces
(megabatch/losses/ops.py), so a compiled model that calls the loss with this backend has no graph
break (fullgraph=True works) and the kernels run as they are (the loss has nothing for inductor to
fuse). The three entry points stay torch.compiler.disable'd: code that calls them directly under
torch.compile gets a graph break there rather than a failed trace.
The design and its FLOP/byte accounting: benchmarks/triton_notes.md.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import triton
from torch import Tensor

from ._triton_gemm import grad_gemm_kernel
from ._triton_tiles import clip_grad_tile_kernel, clip_stats_kernel, lse_merge_kernel, siglip_tile_kernel
from .base import BlockGrads, ClipStats, Positives, RowSink, SiglipBlock, Target
from .torch_chunked import TorchChunkedKernels
from .triton_config import TritonConfig, interpreting

FP16_G_SCALE = 2.0**14  # |G'| <= 2, so 2 * 2**14 < 65504; probabilities ~1e-8 stay normal fp16


def _hi_lo(lse: Tensor) -> tuple[Tensor, Tensor]:
    """A log-sum-exp vector (float64, or float32) as an fp32 pair hi + lo (+inf: hi +inf, lo 0)."""
    hi = lse.to(torch.float32).contiguous()
    lo = torch.nan_to_num((lse.double() - hi.double()).to(torch.float32), nan=0.0)
    return hi, lo.contiguous()


def _pos_args(pos: Optional[Positives], like: Tensor) -> tuple[dict, int]:
    """The logit kernels' positive arguments for one super-block, and its POS mode (0, 1, 2)."""
    if pos is None:
        return dict(pos_offset=0, pos_count=0, xid_ptr=like, yid_ptr=like), 0
    if pos.by_ids:
        return dict(pos_offset=0, pos_count=0, xid_ptr=pos.image_ids, yid_ptr=pos.text_ids), 2
    return dict(pos_offset=pos.offset, pos_count=pos.count, xid_ptr=like, yid_ptr=like), 1


class _Launch:
    """One call's launch plan: the config in force, the logit kernels' kwargs, the super-blocks."""

    def __init__(self, cfg: TritonConfig, dtype: torch.dtype):
        self.cfg = cfg
        if dtype == torch.float32:
            self.prec = cfg.fp32_precision or ("tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32")
        else:
            self.prec = "tf32"  # ignored for 16-bit operands
        self.g_scale = FP16_G_SCALE if dtype == torch.float16 else 1.0
        self.precise_log1p = dtype == torch.float32  # 16-bit inputs: a cheaper log1p (see _triton_tiles)
        self.tile = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=interpreting(),
                         PRECISION=self.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.max_regs is not None:
            self.tile["maxnreg"] = cfg.max_regs

    def even(self, rows: int, cols: int, dim: int) -> bool:
        """No edge tile in this super-block (and D a multiple of block_k): its kernels need no masks."""
        cfg = self.cfg
        return rows % cfg.block_m == 0 and cols % cfg.block_n == 0 and dim % cfg.block_k == 0

    def blocks(self, b: int, n: int) -> Iterator[tuple[int, int, int, int, tuple[int, int]]]:
        """(r0, rows, c0, cols, logit-kernel grid) of every super-block, rows outer."""
        cfg = self.cfg
        for r0 in range(0, b, cfg.super_rows):
            for c0 in range(0, n, cfg.super_cols):
                rows, cols = min(cfg.super_rows, b - r0), min(cfg.super_cols, n - c0)
                yield r0, rows, c0, cols, (triton.cdiv(rows, cfg.block_m), triton.cdiv(cols, cfg.block_n))

    def scratch(self, x: Tensor, b: int, n: int) -> Tensor:
        """Room for one super-block of scaled tile gradients G', in the input dtype."""
        return torch.empty(min(b, self.cfg.super_rows), min(n, self.cfg.super_cols), dtype=x.dtype, device=x.device)

    def grad_gemms(self, g: Tensor, x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, alpha: float) -> None:
        """gx += alpha * g @ y and gy += alpha * g.T @ x (g: the used (rows, cols) part of the scratch)."""
        cfg = self.cfg
        rows, cols = g.shape
        dim = x.shape[1]
        if cfg.grad_gemm == "cublas":
            if x.dtype == torch.float32:
                gx.addmm_(g, y, alpha=alpha)
                gy.addmm_(g.T, x, alpha=alpha)
            else:
                gx.add_(torch.mm(g, y, out_dtype=torch.float32), alpha=alpha)
                gy.add_(torch.mm(g.T, x, out_dtype=torch.float32), alpha=alpha)
            return
        tiles_d = triton.cdiv(dim, cfg.gemm_d)
        tiles_x = triton.cdiv(rows, cfg.gemm_m) * tiles_d
        tiles_y = triton.cdiv(cols, cfg.gemm_m) * tiles_d
        grad_gemm_kernel[(tiles_x + tiles_y,)](
            g, x, y, gx, gy, alpha, rows, cols, dim, tiles_x,
            g.stride(0), x.stride(0), x.stride(1), y.stride(0), y.stride(1), gx.stride(0), gy.stride(0),
            BLOCK_M=cfg.gemm_m, BLOCK_D=cfg.gemm_d, BLOCK_K=cfg.gemm_k, UPCAST=interpreting(), PRECISION=self.prec,
            num_warps=cfg.gemm_warps, num_stages=cfg.gemm_stages,
        )


class _RowAcc:
    """Where the gradient GEMMs accumulate gx: the whole (b, D) fp32 gx, or -- with a RowSink -- one
    (super_rows, D) fp32 buffer per row of super-blocks, handed to the sink when that row is done
    (rows are visited outermost, so gx_I is final after its last column super-block)."""

    def __init__(self, x: Tensor, b: int, super_rows: int, rows: Optional[RowSink]):
        self.sink = rows
        self.gx: Optional[Tensor] = None
        self.buf: Optional[Tensor] = None
        if rows is None:
            self.gx = torch.zeros(b, x.shape[1], dtype=torch.float32, device=x.device)
        else:
            self.buf = torch.empty(min(b, super_rows), x.shape[1], dtype=torch.float32, device=x.device)

    def rows(self, r0: int, rows: int, c0: int) -> Tensor:
        """The accumulator of rows r0 .. r0 + rows, as the first column super-block (c0 = 0) starts."""
        if self.buf is None:
            assert self.gx is not None
            return self.gx[r0:r0 + rows]
        if c0 == 0:
            self.buf[:rows].zero_()
        return self.buf[:rows]

    def done(self, r0: int, rows: int, last: bool) -> None:
        """After a super-block: hand the row block over if it was its last column super-block."""
        if self.sink is not None and last:
            assert self.buf is not None
            self.sink(r0, self.buf[:rows])


class TritonKernels:
    """Fused Triton block kernels (see base.py for the contract, this module's header for the plan)."""

    name = "triton"

    def __init__(self, config: Optional[TritonConfig] = None):
        """config: one TritonConfig for every dtype; None picks TritonConfig.default(dtype) per call
        (TritonConfig.interpreter() under TRITON_INTERPRET=1)."""
        self.config = config

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def _launch(self, x: Tensor) -> _Launch:
        cfg = self.config
        if cfg is None:
            cfg = TritonConfig.interpreter() if interpreting() else TritonConfig.default(x.dtype)
        return _Launch(cfg, x.dtype)

    @torch.compiler.disable
    def clip_stats(self, x: Tensor, y: Tensor, scale: Tensor, pos: Optional[Positives]) -> ClipStats:
        if x.dtype == torch.float64:
            return TorchChunkedKernels().clip_stats(x, y, scale, pos)
        plan = self._launch(x)
        cfg, b, n = plan.cfg, x.shape[0], y.shape[0]
        scale = scale.to(torch.float32)
        run = torch.empty(2, b + n, dtype=torch.float32, device=x.device)  # running (max, sumexp): rows, columns
        run[0].fill_(float("-inf"))
        run[1].zero_()
        row_m, row_l, col_m, col_l = run[0, :b], run[1, :b], run[0, b:], run[1, b:]
        # Per-tile partials of one super-block: (max, sumexp, positive-logit sum) of rows and of columns.
        rowpart = torch.empty(3, triton.cdiv(min(n, cfg.super_cols), cfg.block_n), min(b, cfg.super_rows),
                              dtype=torch.float32, device=x.device)
        colpart = torch.empty(3, triton.cdiv(min(b, cfg.super_rows), cfg.block_m), min(n, cfg.super_cols),
                              dtype=torch.float32, device=x.device)
        row_pos = col_pos = None
        if pos is not None:
            row_pos = torch.zeros(b, dtype=torch.float64, device=x.device)
            col_pos = torch.zeros(n, dtype=torch.float64, device=x.device)
        mb = cfg.merge_block
        for r0, rows, c0, cols, grid in plan.blocks(b, n):
            xi, yj = x[r0:r0 + rows], y[c0:c0 + cols]
            sub = None if pos is None else pos.restrict(r0, rows, c0, cols)
            args, mode = _pos_args(sub, xi)
            clip_stats_kernel[grid](
                xi, yj, scale, rowpart[0], rowpart[1], colpart[0], colpart[1], rowpart[2], colpart[2], rows, cols,
                x.shape[1], *args.values(),
                xi.stride(0), xi.stride(1), yj.stride(0), yj.stride(1), rowpart.stride(1), colpart.stride(1),
                EVEN=plan.even(rows, cols, x.shape[1]), POS=mode, **plan.tile,
            )
            lse_merge_kernel[(triton.cdiv(rows, mb),)](
                rowpart[0], rowpart[1], row_m[r0:], row_l[r0:], rows, grid[1], rowpart.stride(1), BLOCK=mb)
            lse_merge_kernel[(triton.cdiv(cols, mb),)](
                colpart[0], colpart[1], col_m[c0:], col_l[c0:], cols, grid[0], colpart.stride(1), BLOCK=mb)
            if mode:
                assert row_pos is not None and col_pos is not None
                row_pos[r0:r0 + rows] += rowpart[2, :grid[1], :rows].sum(0, dtype=torch.float64)
                col_pos[c0:c0 + cols] += colpart[2, :grid[0], :cols].sum(0, dtype=torch.float64)
        # Rounded once, in float64: exp(S - lse) then keeps fp32 precision where S is near lse
        # (clip_grads passes lse to the kernel as an fp32 hi + lo pair), and lse - (a positive logit
        # of the same tile) is exact where that logit is the max.
        lse = run[1].double().log_().add_(run[0].double())
        return ClipStats(lse[:b], lse[b:], row_pos, col_pos)

    @torch.compiler.disable
    def clip_grads(
        self, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, *, weight: float,
        pos: Optional[Positives], targets: tuple[Target, Target] = (1.0, 1.0), rows: Optional[RowSink] = None,
    ) -> BlockGrads:
        if x.dtype == torch.float64:
            return TorchChunkedKernels().clip_grads(x, y, scale, row_lse, col_lse, weight=weight, pos=pos,
                                                    targets=targets, rows=rows)
        plan = self._launch(x)
        b, n, dim = x.shape[0], y.shape[0], x.shape[1]
        scale = scale.to(torch.float32)
        row_hi, row_lo = _hi_lo(row_lse)
        col_hi, col_lo = _hi_lo(col_lse)
        rt, ct = targets
        vec = isinstance(rt, Tensor) or isinstance(ct, Tensor)
        pos_value = 0.0
        if vec:  # per-row and per-column targets, as two fp32 vectors
            rt, ct = (t.to(torch.float32).contiguous() if isinstance(t, Tensor)
                      else torch.full((k,), float(t), dtype=torch.float32, device=x.device) for t, k in ((rt, b), (ct, n)))
        else:
            pos_value = float(rt) + float(ct)
        acc = _RowAcc(x, b, plan.cfg.super_rows, rows)
        gy = torch.zeros(n, dim, dtype=torch.float32, device=x.device)
        g = plan.scratch(x, b, n)
        for r0, nr, c0, nc, grid in plan.blocks(b, n):
            xi, yj = x[r0:r0 + nr], y[c0:c0 + nc]
            sub = None if pos is None else pos.restrict(r0, nr, c0, nc)
            args, mode = _pos_args(sub, xi)
            targets_ij = (rt[r0:], ct[c0:]) if vec else (row_hi, row_hi)  # placeholders, never read
            clip_grad_tile_kernel[grid](
                xi, yj, scale, row_hi[r0:], row_lo[r0:], col_hi[c0:], col_lo[c0:], g, nr, nc, dim,
                *args.values(), pos_value, *targets_ij,
                xi.stride(0), xi.stride(1), yj.stride(0), yj.stride(1), g.stride(0),
                G_SCALE=plan.g_scale, POS=mode, TARGET_VEC=vec, EVEN=plan.even(nr, nc, dim), **plan.tile,
            )
            plan.grad_gemms(g[:nr, :nc], xi, yj, acc.rows(r0, nr, c0), gy[c0:c0 + nc], weight / plan.g_scale)
            acc.done(r0, nr, c0 + nc == n)
        return BlockGrads(acc.gx, gy)

    @torch.compiler.disable
    def siglip_block(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, weight: float, pos: Optional[Positives],
        grads: bool, rows: Optional[RowSink] = None,
    ) -> SiglipBlock:
        if x.dtype == torch.float64:
            return TorchChunkedKernels().siglip_block(x, y, scale, bias, weight=weight, pos=pos, grads=grads,
                                                      rows=rows)
        plan = self._launch(x)
        cfg, b, n, dim = plan.cfg, x.shape[0], y.shape[0], x.shape[1]
        scale, bias = scale.to(torch.float32), bias.to(torch.float32)
        # One slot per program of a full super-block: each launch adds its tile sums to its own slots.
        slots = triton.cdiv(min(b, cfg.super_rows), cfg.block_m) * triton.cdiv(min(n, cfg.super_cols), cfg.block_n)
        loss = torch.zeros(slots, dtype=torch.float32, device=x.device)
        gbias = torch.zeros(slots, dtype=torch.float32, device=x.device)
        if grads:
            acc = _RowAcc(x, b, plan.cfg.super_rows, rows)
            gy = torch.zeros(n, dim, dtype=torch.float32, device=x.device)
            g = plan.scratch(x, b, n)
        else:
            g = loss  # a placeholder pointer, never written (WRITE_G=False)
        for r0, nr, c0, nc, grid in plan.blocks(b, n):
            xi, yj = x[r0:r0 + nr], y[c0:c0 + nc]
            sub = None if pos is None else pos.restrict(r0, nr, c0, nc)
            args, mode = _pos_args(sub, xi)
            siglip_tile_kernel[grid](
                xi, yj, scale, bias, g, loss, gbias, nr, nc, dim, *args.values(),
                xi.stride(0), xi.stride(1), yj.stride(0), yj.stride(1), g.stride(0),
                G_SCALE=plan.g_scale, POS=mode, WRITE_G=grads,
                EVEN=plan.even(nr, nc, dim), PRECISE_LOG1P=plan.precise_log1p, **plan.tile,
            )
            if grads:
                plan.grad_gemms(g[:nr, :nc], xi, yj, acc.rows(r0, nr, c0), gy[c0:c0 + nc], weight / plan.g_scale)
                acc.done(r0, nr, c0 + nc == n)
        total = loss.sum() * weight
        if not grads:
            return SiglipBlock(total, None, None, None)
        return SiglipBlock(total, acc.gx, gy, gbias.sum() * weight)


__all__ = ["TritonConfig", "TritonKernels", "interpreting"]
