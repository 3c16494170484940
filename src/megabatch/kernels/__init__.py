"""Block-kernel backends and their selection. See base.py for the contract every backend meets."""
from __future__ import annotations

from typing import Union

import torch

from .base import BlockKernels
from .dense import DenseKernels
from .torch_chunked import TorchChunkedKernels

BACKENDS = ("auto", "torch", "triton", "dense")


def _triton_kernels() -> BlockKernels | None:
    try:
        from .triton_kernels import TritonKernels
    except ImportError:
        return None
    return TritonKernels()


def get_backend(name: Union[str, BlockKernels], device: torch.device) -> BlockKernels:
    """Resolve a backend name (or a configured backend instance, e.g. ``TritonKernels(TritonConfig(...))``)
    for features on `device`.

    "auto" picks "triton" for CUDA tensors when Triton is importable, else "torch"; it never picks
    "dense". Asking for "triton" where it cannot run raises ValueError.
    """
    if not isinstance(name, str) and all(hasattr(name, a) for a in ("name", "supports", "clip_stats", "clip_grads", "siglip_block")):
        if not name.supports(device):
            raise ValueError(f"backend {name.name!r} cannot run on features on {device}")
        return name
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return TorchChunkedKernels()
    if name == "dense":
        return DenseKernels()
    if name == "auto":
        if device.type == "cuda":
            triton = _triton_kernels()
            if triton is not None and triton.supports(device):
                return triton
        return TorchChunkedKernels()
    triton = _triton_kernels()
    if triton is None:
        raise ValueError("backend='triton' needs the triton package (pip install 'megabatch[triton]')")
    if not triton.supports(device):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got features on {device}"
        )
    return triton


__all__ = ["BACKENDS", "BlockKernels", "DenseKernels", "TorchChunkedKernels", "get_backend"]
