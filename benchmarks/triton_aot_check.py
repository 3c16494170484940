"""Compile megabatch's Triton kernels for an H100 (sm_90) on a machine without a GPU and report,
per kernel: registers per thread, spill bytes, shared memory, whether the main loop is software-
pipelined (async copies in the TTGIR) and whether it uses wgmma.

    PYTHONPATH=src python benchmarks/triton_aot_check.py [--dim 512 1152 129] [--dtype bf16 fp16 fp32]

Arguments are specialised the way Triton's JIT does at launch (pointers 16-byte aligned, ints
divisible by 16 marked so, ints equal to 1 made constants), for the default TritonConfig and a
full super-block. Needs only the triton wheel (it ships ptxas and cuobjdump). It is a static
check: the GPU run (gpu_check.py, see gpu.md) measures what the numbers mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch.kernels import _triton_gemm, _triton_tiles  # noqa: E402
from megabatch.kernels.triton_kernels import TritonConfig  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_like_jit(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg=None):
    """args: name -> value; a str value is a pointer's element type ("bf16"), an int/float a scalar."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            signature[name] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


def resources(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    ttgir = kernel.asm["ttgir"]
    pipelined = "async_copy" in ttgir or "async_tma" in ttgir
    wgmma = "warp_group_dot" in ttgir
    return (f"regs {m.group(1):>3}  spill {m.group(2):>4} B  smem {kernel.metadata.shared // 1024:>3} KiB  "
            f"pipelined {'yes' if pipelined else 'NO '}  wgmma {'yes' if wgmma else 'no'}")


def check(dim: int, dtype: str, cfg: TritonConfig, even: bool = True, ids: bool = False) -> None:
    rows = cols = cfg.super_rows
    prec = "tf32" if dtype != "fp32" else "tf32x3"
    # EVEN as at launch: full super-blocks are unmasked when D is a multiple of block_k.
    tile = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=False, PRECISION=prec,
                EVEN=even and dim % cfg.block_k == 0)
    feats = dict(x_ptr=dtype, y_ptr=dtype, scale_ptr="fp32", rows=rows, cols=cols, dim=dim,
                 stride_xm=dim, stride_xk=1, stride_yn=dim, stride_yk=1)
    w, s = cfg.num_warps, cfg.num_stages
    # Positive arguments: POS 1 (index positives: the diagonal super-blocks, the heavier variant of the
    # POS 0 most super-blocks run), 2 (ids).
    pos = dict(pos_offset=0, pos_count=rows, xid_ptr="i64", yid_ptr="i64")
    grad = dict(feats, **pos, row_hi_ptr="fp32", row_lo_ptr="fp32", col_hi_ptr="fp32", col_lo_ptr="fp32", g_ptr=dtype,
                pos_value=2.0, rt_ptr="fp32", ct_ptr="fp32", stride_g=cols)
    stats = dict(feats, **pos, row_m_ptr="fp32", row_l_ptr="fp32", col_m_ptr="fp32", col_l_ptr="fp32",
                 row_p_ptr="fp32", col_p_ptr="fp32", stride_rowpart=rows, stride_colpart=cols)
    sig = dict(feats, **pos, bias_ptr="fp32", g_ptr=dtype, loss_ptr="fp32", gbias_ptr="fp32", stride_g=cols)
    jobs = [
        ("clip_stats", _triton_tiles.clip_stats_kernel, stats, dict(tile, POS=1), w, s),
        ("clip_grad_tile", _triton_tiles.clip_grad_tile_kernel, grad,
         dict(tile, G_SCALE=1.0, POS=1, TARGET_VEC=False), w, s),
        ("siglip_tile", _triton_tiles.siglip_tile_kernel, sig,
         dict(tile, G_SCALE=1.0, POS=1, WRITE_G=True, PRECISE_LOG1P=dtype == "fp32"), w, s),
        ("grad_gemm", _triton_gemm.grad_gemm_kernel,
         dict(g_ptr=dtype, x_ptr=dtype, y_ptr=dtype, gx_ptr="fp32", gy_ptr="fp32", alpha=0.5, rows=rows, cols=cols,
              dim=dim, tiles_x=1000, stride_g=cols, stride_xm=dim, stride_xk=1, stride_yn=dim, stride_yk=1,
              stride_gx=dim, stride_gy=dim),
         dict(BLOCK_M=cfg.gemm_m, BLOCK_D=cfg.gemm_d, BLOCK_K=cfg.gemm_k, UPCAST=False, PRECISION=prec),
         cfg.gemm_warps, cfg.gemm_stages),
    ]
    if ids:
        jobs += [
            ("clip_stats_ids", _triton_tiles.clip_stats_kernel, stats, dict(tile, POS=2), w, s),
            ("clip_grad_ids", _triton_tiles.clip_grad_tile_kernel, grad,
             dict(tile, G_SCALE=1.0, POS=2, TARGET_VEC=True), w, s),
            ("siglip_tile_ids", _triton_tiles.siglip_tile_kernel, sig,
             dict(tile, G_SCALE=1.0, POS=2, WRITE_G=True, PRECISE_LOG1P=dtype == "fp32"), w, s),
        ]
    for name, fn, args, consts, nw, ns in jobs:
        cap = cfg.max_regs if name != "grad_gemm" else None  # TritonConfig.max_regs caps the tile kernels
        try:
            print(f"  {name:<15} {resources(compile_like_jit(fn, args, consts, nw, ns, cap))}")
        except Exception as e:  # a compile failure is the finding
            print(f"  {name:<15} COMPILE FAILED: {type(e).__name__}: {str(e)[:300]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, nargs="+", default=[512, 1152, 129])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    p.add_argument("--max-regs", type=int, default=None, help="TritonConfig.max_regs for the tile kernels")
    p.add_argument("--ids", action="store_true", help="also the tile kernels' positives-by-ids variants (POS=2)")
    a = p.parse_args()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    print(f"triton {triton.__version__}, target sm_90")
    for dtype in a.dtype:
        cfg = dataclasses.replace(TritonConfig.default(torch_dtype[dtype]), max_regs=a.max_regs)
        print(f"{dtype}: {cfg}")
        for dim in a.dim:
            print(f" D={dim}")
            check(dim, dtype, cfg, ids=a.ids)


if __name__ == "__main__":
    main()
