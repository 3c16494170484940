"""Triton kernel for the two gradient GEMMs of one super-block, in one launch.

Given the super-block's scaled tile gradients G' (rows, cols) written by _triton_tiles.py:
  gx_I[rows, D] += alpha * G' @ y_J        (programs 0 .. tiles_x - 1)
  gy_J[cols, D] += alpha * G'.T @ x_I      (programs tiles_x ..)
gx and gy are fp32 accumulators owned by the caller; each output tile (BLOCK_M, BLOCK_D) belongs
to exactly one program, which reads it once, adds its K-reduction (K = cols or rows, BLOCK_K at a
time, fp32 accumulation in registers) and writes it back: no atomics, deterministic. G' and the
features share one dtype (bf16/fp16 on tensor cores; fp32 with `PRECISION`); alpha = weight /
G_SCALE. Programs are ordered with the D tiles fastest, so the programs reading one panel of G'
run together and the panel is fetched from HBM about once.
Shapes: any rows, cols, D >= 1 (masked); offsets stay in int32 because a super-block is small.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _accumulate_tile(
    a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bd, out_ptr, stride_om, alpha, m_size, k_size, dim, tile,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[tile] += alpha * A[m_size, k_size] @ B[k_size, dim] for output tile number `tile`."""
    tiles_d = tl.cdiv(dim, BLOCK_D)
    pid_m = tile // tiles_d
    pid_d = tile % tiles_d
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rd[None, :] * stride_bd
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < m_size) & (rk[None, :] < k_size - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_size - k0) & (rd[None, :] < dim), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (rm[:, None] < m_size) & (rd[None, :] < dim)
    o_ptrs = out_ptr + rm[:, None] * stride_om + rd[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=mask, other=0.0) + alpha * acc, mask=mask)


@triton.jit
def grad_gemm_kernel(
    g_ptr, x_ptr, y_ptr, gx_ptr, gy_ptr, alpha, rows, cols, dim, tiles_x,
    stride_g, stride_xm, stride_xk, stride_yn, stride_yk, stride_gx, stride_gy,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < tiles_x:
        _accumulate_tile(g_ptr, stride_g, 1, y_ptr, stride_yn, stride_yk, gx_ptr, stride_gx, alpha, rows, cols, dim,
                         pid, BLOCK_M, BLOCK_D, BLOCK_K, UPCAST, PRECISION)
    else:
        _accumulate_tile(g_ptr, 1, stride_g, x_ptr, stride_xm, stride_xk, gy_ptr, stride_gy, alpha, cols, rows, dim,
                         pid - tiles_x, BLOCK_M, BLOCK_D, BLOCK_K, UPCAST, PRECISION)
