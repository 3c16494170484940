"""Triton kernels that compute logit tiles S = s * x_I @ y_J.T and consume them in registers.

Each program computes one (BLOCK_M, BLOCK_N) tile of logits for a super-block (x_I, y_J) of the
block (rows r0.., columns c0..), reducing over D in BLOCK_K chunks (masked: any D >= 1, odd D
fine), with fp32 accumulation (tl.dot; bf16/fp16 operands on tensor cores, fp32 operands with
the `PRECISION` passed in: "tf32", "tf32x3" or "ieee"). The tile never leaves the program; what
is written is O(tile edge) statistics or, for the gradient passes, the tile's dL/dS in the input
dtype (to a scratch buffer of one super-block, read by _triton_gemm.py).

Math (exp(a) is evaluated as exp2(a * log2(e)) and log as log2 * ln(2): the hardware's fast units;
differences like S - lse are taken in natural units first, so the large logits' rounding does not
get multiplied by log2(e) before they cancel):
  clip stats   row partial (m_i, l_i) = (max_j S_ij, sum_j exp(S_ij - m_i)) over the tile's columns,
               and the same by column; merged into running pairs; lse = m + log l at the very end
               and, for a block with positives, each row's and column's sum of positive logits
  clip grads   G'_ij = exp(S_ij - r_i) + exp(S_ij - c_j) - pos_ij (rt_i + ct_j)   (r, c: the full lse
               vectors, each passed as an fp32 hi + lo pair of the float64 value clip_stats returns,
               +inf where a row or column takes no part; rt + ct a scalar for index positives)
  siglip       u = -z (S + bias),  loss = max(u, 0) + log1p(exp(-|u|)),  G' = -z sigmoid(u)
Positives (POS, a launch-time constant): 0 none; 1 index, pair (i, i + pos_offset) for
i < pos_count (super-block coordinates); 2 ids, image_ids[i] == text_ids[j] (two int64 vectors
loaded per tile, compared in registers).
G' is stored multiplied by G_SCALE (a power of two: 2**14 for fp16, so that probabilities ~1/B
stay normal numbers; 1 otherwise) and without the caller's `weight` (applied in the GEMMs).
log1p(e), e = exp(-|u|) in (0, 1], is a polynomial (degree 9 for fp32 inputs, 5 for 16-bit ones;
no division, no log near 1: the hardware lg2 has an absolute, not relative, error there). Per
logit the SigLIP epilogue costs two MUFU operations (ex2, and the reciprocal in sigmoid) and
about 21 FP32 ops at 16 bits (26 for fp32 inputs); CLIP's two ex2.

EVEN (a launch-time constant): rows, cols and D are multiples of the tile, so no load, store or
reduction is masked (every super-block but the ragged last ones, at the usual sizes).
Shapes: x_I (rows, D), y_J (cols, D) with any strides; rows, cols < 2**31 / D (super-blocks keep
every offset in int32). UPCAST converts loaded operands to fp32 (the CPU interpreter cannot
multiply bf16); on the GPU it is False.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _logit_tile(
    x_ptr, y_ptr, stride_xm, stride_xk, stride_yn, stride_yk, rows, cols, dim, pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr,
):
    """(x_I[tile rows] @ y_J[tile cols].T in fp32 (no scale), the tile's row indices, its column
    indices). Rows/cols past the edge give 0. EVEN: the caller guarantees rows, cols and dim are
    multiples of the blocks, so no load is masked."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    b_ptrs = y_ptr + rn[None, :] * stride_yn + rk[:, None] * stride_yk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(rm[:, None] < rows) & (rk[None, :] < dim - k0), other=0.0)
            b = tl.load(b_ptrs, mask=(rn[None, :] < cols) & (rk[:, None] < dim - k0), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_yk
    return acc, rm, rn


@triton.jit
def _positives(rm, rn, pos_offset, pos_count, xid_ptr, yid_ptr, ok_m, ok_n, POS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: the positive pairs of the tile (POS 1: index, 2: ids), never past the edge."""
    if POS == 1:
        pos = (rm[:, None] + pos_offset == rn[None, :]) & (rm[:, None] < pos_count)
    else:
        xid = tl.load(xid_ptr + rm, mask=ok_m, other=0)
        yid = tl.load(yid_ptr + rn, mask=ok_n, other=0)
        pos = xid[:, None] == yid[None, :]
    return pos & ok_m[:, None] & ok_n[None, :]


@triton.jit
def _log1p_unit(e, PRECISE: tl.constexpr):
    """log(1 + e) for 0 <= e <= 1 as e * p(e), p a Chebyshev fit of log1p(e)/e, so neither a
    division nor the hardware log near 1 is needed. PRECISE (fp32 inputs): degree 9, relative error
    < 2.5e-7 in fp32 Horner; else (16-bit inputs) degree 5, < 1.9e-5 -- 25x below fp16's unit
    roundoff, 200x below bf16's -- four FMAs fewer per logit."""
    if PRECISE:
        p = -0.003256378462538123 * e + 0.019907161593437195
        p = p * e - 0.057064201682806015
        p = p * e + 0.10614264756441116
        p = p * e - 0.15311862528324127
        p = p * e + 0.19678117334842682
        p = p * e - 0.24954558908939362
        p = p * e + 0.33330005407333374
        p = p * e - 0.4999990463256836
        p = p * e + 1.0
    else:
        p = -0.023689109832048416 * e + 0.10028679668903351
        p = p * e - 0.20866923034191132
        p = p * e + 0.3244116008281708
        p = p * e - 0.49918779730796814
        p = p * e + 0.9999818801879883
    return p * e


@triton.jit
def clip_stats_kernel(
    x_ptr, y_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, row_p_ptr, col_p_ptr, rows, cols, dim,
    pos_offset, pos_count, xid_ptr, yid_ptr,
    stride_xm, stride_xk, stride_yn, stride_yk, stride_rowpart, stride_colpart,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr, POS: tl.constexpr,
):
    """Per-tile (max, sum exp(S - max)) of each row, at [pid_n, i], and of each column, at [pid_m, j];
    with POS also the tile's sum of positive logits of each row (row_p) and column (col_p)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc, rm, rn = _logit_tile(x_ptr, y_ptr, stride_xm, stride_xk, stride_yn, stride_yk, rows, cols, dim, pid_m, pid_n,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN)
    ok_m = rm < rows
    ok_n = rn < cols
    # Masked even when EVEN: without the select sm_90 codegen takes 170 registers instead of 128
    # (triton 3.8, static compile), one CTA per SM instead of two.
    t = tl.where(ok_m[:, None] & ok_n[None, :], acc * tl.load(scale_ptr).to(tl.float32), float("-inf"))
    # Rows (columns) past the edge have max -inf: shift them by 0 instead, and never store them.
    m_row = tl.where(ok_m, tl.max(t, axis=1), 0.0)
    tl.store(row_m_ptr + pid_n * stride_rowpart + rm, m_row, mask=ok_m)
    tl.store(row_l_ptr + pid_n * stride_rowpart + rm, tl.sum(tl.exp2((t - m_row[:, None]) * LOG2E), axis=1), mask=ok_m)
    m_col = tl.where(ok_n, tl.max(t, axis=0), 0.0)
    tl.store(col_m_ptr + pid_m * stride_colpart + rn, m_col, mask=ok_n)
    tl.store(col_l_ptr + pid_m * stride_colpart + rn, tl.sum(tl.exp2((t - m_col[None, :]) * LOG2E), axis=0), mask=ok_n)
    if POS != 0:
        picked = tl.where(_positives(rm, rn, pos_offset, pos_count, xid_ptr, yid_ptr, ok_m, ok_n, POS), t, 0.0)
        tl.store(row_p_ptr + pid_n * stride_rowpart + rm, tl.sum(picked, axis=1), mask=ok_m)
        tl.store(col_p_ptr + pid_m * stride_colpart + rn, tl.sum(picked, axis=0), mask=ok_n)


@triton.jit
def lse_merge_kernel(part_m_ptr, part_l_ptr, run_m_ptr, run_l_ptr, length, parts, stride_part, BLOCK: tl.constexpr):
    """Fold `parts` partial (max, sumexp) pairs into the running pair (run_m may start at -inf, run_l at 0).

    Keeping (max, sumexp) instead of partial lse values means lse = max + log(sumexp) is rounded
    once, at the end, like a single-pass logsumexp.
    """
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < length
    m = tl.load(run_m_ptr + idx, mask=ok, other=0.0)
    total = tl.load(run_l_ptr + idx, mask=ok, other=0.0)
    for p in range(0, parts):
        v_m = tl.load(part_m_ptr + p * stride_part + idx, mask=ok, other=0.0)
        v_l = tl.load(part_l_ptr + p * stride_part + idx, mask=ok, other=0.0)
        m_new = tl.maximum(m, v_m)
        total = total * tl.exp2((m - m_new) * LOG2E) + v_l * tl.exp2((v_m - m_new) * LOG2E)
        m = m_new
    tl.store(run_m_ptr + idx, m, mask=ok)
    tl.store(run_l_ptr + idx, total, mask=ok)


@triton.jit
def clip_grad_tile_kernel(
    x_ptr, y_ptr, scale_ptr, row_hi_ptr, row_lo_ptr, col_hi_ptr, col_lo_ptr, g_ptr, rows, cols, dim,
    pos_offset, pos_count, xid_ptr, yid_ptr, pos_value, rt_ptr, ct_ptr,
    stride_xm, stride_xk, stride_yn, stride_yk, stride_g,
    G_SCALE: tl.constexpr, POS: tl.constexpr, TARGET_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr,
):
    """G'[i, j] = (P_row + P_col - pos_ij * target) * G_SCALE, stored in g_ptr's dtype; target =
    rt_i + ct_j (TARGET_VEC: two fp32 vectors) or pos_value."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc, rm, rn = _logit_tile(x_ptr, y_ptr, stride_xm, stride_xk, stride_yn, stride_yk, rows, cols, dim, pid_m, pid_n,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN)
    ok_m = rm < rows
    ok_n = rn < cols
    t = acc * tl.load(scale_ptr).to(tl.float32)
    # lse = hi + lo (fp32 pair of a float64 value): S - hi is exact where S is near lse (Sterbenz),
    # so softmax weights near 1 keep full fp32 precision even when |S| is large.
    r_hi = tl.load(row_hi_ptr + rm, mask=ok_m, other=0.0)
    r_lo = tl.load(row_lo_ptr + rm, mask=ok_m, other=0.0)
    c_hi = tl.load(col_hi_ptr + rn, mask=ok_n, other=0.0)
    c_lo = tl.load(col_lo_ptr + rn, mask=ok_n, other=0.0)
    g = tl.exp2(((t - r_hi[:, None]) - r_lo[:, None]) * LOG2E) + tl.exp2(((t - c_hi[None, :]) - c_lo[None, :]) * LOG2E)
    if POS != 0:
        pos = _positives(rm, rn, pos_offset, pos_count, xid_ptr, yid_ptr, ok_m, ok_n, POS)
        if TARGET_VEC:
            rt = tl.load(rt_ptr + rm, mask=ok_m, other=0.0)
            ct = tl.load(ct_ptr + rn, mask=ok_n, other=0.0)
            g = tl.where(pos, g - (rt[:, None] + ct[None, :]), g)
        else:
            g = tl.where(pos, g - pos_value, g)
    g = (g * G_SCALE).to(g_ptr.dtype.element_ty)
    if EVEN:
        tl.store(g_ptr + rm[:, None] * stride_g + rn[None, :], g)
    else:
        tl.store(g_ptr + rm[:, None] * stride_g + rn[None, :], g, mask=ok_m[:, None] & ok_n[None, :])


@triton.jit
def siglip_tile_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, g_ptr, loss_ptr, gbias_ptr, rows, cols, dim,
    pos_offset, pos_count, xid_ptr, yid_ptr,
    stride_xm, stride_xk, stride_yn, stride_yk, stride_g,
    G_SCALE: tl.constexpr, POS: tl.constexpr, WRITE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr, PRECISE_LOG1P: tl.constexpr,
):
    """loss[slot] += sum softplus(-z(S + bias)); with WRITE_G also G' (scaled) and gbias[slot] += sum G'.

    slot = the program's flat id: each program owns its slot, so successive launches (super-blocks
    on one stream) accumulate without atomics and the final sum is deterministic.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = pid_m * tl.num_programs(1) + pid_n
    acc, rm, rn = _logit_tile(x_ptr, y_ptr, stride_xm, stride_xk, stride_yn, stride_yk, rows, cols, dim, pid_m, pid_n,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN)
    ok_m = rm < rows
    ok_n = rn < cols
    ok = ok_m[:, None] & ok_n[None, :]
    t = acc * tl.load(scale_ptr).to(tl.float32) + tl.load(bias_ptr).to(tl.float32)
    if POS != 0:
        pos = _positives(rm, rn, pos_offset, pos_count, xid_ptr, yid_ptr, ok_m, ok_n, POS)
        u = tl.where(pos, -t, t)
    else:
        u = t
    e = tl.exp2(-tl.abs(u) * LOG2E)
    loss = tl.maximum(u, 0.0) + _log1p_unit(e, PRECISE_LOG1P)
    if not EVEN:
        loss = tl.where(ok, loss, 0.0)
    tl.store(loss_ptr + slot, tl.load(loss_ptr + slot) + tl.sum(tl.sum(loss, axis=1), axis=0))
    if WRITE_G:
        sig = tl.where(u >= 0.0, 1.0, e) / (1.0 + e)
        if POS != 0:
            g = tl.where(pos, -sig, sig)
        else:
            g = sig
        if not EVEN:
            g = tl.where(ok, g, 0.0)
        tl.store(gbias_ptr + slot, tl.load(gbias_ptr + slot) + tl.sum(tl.sum(g, axis=1), axis=0))
        g = (g * G_SCALE).to(g_ptr.dtype.element_ty)
        if EVEN:
            tl.store(g_ptr + rm[:, None] * stride_g + rn[None, :], g)
        else:
            tl.store(g_ptr + rm[:, None] * stride_g + rn[None, :], g, mask=ok)
