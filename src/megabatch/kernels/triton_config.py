"""The triton backend's settings, `TritonConfig`, without importing Triton: `megabatch plan` reads the
default super-block from here on machines without it (kernels/triton_kernels.py uses and re-exports it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


def interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and launch parameters (powers of two >= 16 for the blocks).

    block_m/n/k: the logit tile and its D chunk; gemm_m/d/k: the gradient GEMMs' output tile
    (rows x D) and K chunk; super_rows/cols: the super-block (the scratch holds one);
    grad_gemm: "triton" (grad_gemm_kernel) or "cublas" (torch.mm with fp32 output, CUDA only);
    fp32_precision: None follows torch.get_float32_matmul_precision();
    max_regs: a cap on registers per thread for the logit-tile kernels (ptxas .maxnreg; None: the
    compiler's choice). At the bf16 default the compiler takes about 170 (CLIP grads) and 195-232
    (SigLIP; triton 3.8-3.6): one 256-thread CTA per SM; 128 allows two, at 170-280 bytes of
    spills per thread (static compile: benchmarks/triton_aot_check.py --max-regs 128). The
    interpreter ignores it.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    gemm_m: int = 128
    gemm_d: int = 128
    gemm_k: int = 64
    super_rows: int = 8192
    super_cols: int = 8192
    num_warps: int = 8
    num_stages: int = 3
    gemm_warps: int = 8
    gemm_stages: int = 3
    merge_block: int = 1024
    grad_gemm: str = "triton"
    fp32_precision: Optional[str] = None
    max_regs: Optional[int] = None

    @staticmethod
    def default(dtype: torch.dtype) -> "TritonConfig":
        """The GPU defaults: 128 x 128 tiles; fp32 operands take half the K chunk (shared memory)."""
        if dtype == torch.float32:
            return TritonConfig(block_k=32, gemm_k=32)
        return TritonConfig()

    @staticmethod
    def interpreter() -> "TritonConfig":
        """Small blocks for the CPU interpreter (each block step costs milliseconds there)."""
        return TritonConfig(32, 32, 32, 32, 32, 32, 128, 128, num_warps=4, num_stages=1, gemm_warps=4, gemm_stages=1,
                            merge_block=128)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "gemm_m", "gemm_d", "gemm_k", "merge_block"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {v}")
        if self.super_rows % self.block_m or self.super_cols % self.block_n:
            raise ValueError("TritonConfig.super_rows/super_cols must be multiples of block_m/block_n")
        if self.grad_gemm not in ("triton", "cublas"):
            raise ValueError(f"TritonConfig.grad_gemm must be 'triton' or 'cublas', got {self.grad_gemm!r}")
        if self.max_regs is not None and not (isinstance(self.max_regs, int) and 24 <= self.max_regs <= 255):
            raise ValueError(f"TritonConfig.max_regs must be None or an int in [24, 255], got {self.max_regs!r}")
        if self.fp32_precision not in (None, "tf32", "tf32x3", "ieee"):
            raise ValueError(
                f"TritonConfig.fp32_precision must be None, tf32, tf32x3 or ieee, got {self.fp32_precision!r}")
