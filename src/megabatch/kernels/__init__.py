"""Block-kernel backends and their selection. See base.py for the contract every backend meets."""
from __future__ import annotations

from typing import Union

import torch

from .base import BlockKernels
from .dense import DenseKernels
from .torch_chunked import TorchChunkedKernels

# Every backend name a caller may pass (the losses, their modules, `megabatch bench`, `megabatch plan`, the
# app); "auto" is resolved by `auto_backend` (and, for a device at hand, by `get_backend`).
BACKENDS = ("auto", "torch", "triton", "dense")


def auto_backend(device_type: str) -> str:
    """The backend "auto" names on a device type: triton on CUDA, torch elsewhere ("dense" never).
    `get_backend` still falls back to torch where Triton turns out not to be importable."""
    return "triton" if device_type == "cuda" else "torch"


def _triton_kernels() -> BlockKernels | None:
    try:
        from .triton_kernels import TritonKernels
    except ImportError:
        return None
    return TritonKernels()


def check_backend(backend: object) -> bool:
    """A backend as a caller may give it, before any device is known: a name of BACKENDS (True) or
    an instance with the BlockKernels interface (False); ValueError otherwise. The one check of a
    backend argument (get_backend and every front's construction run it)."""
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return True
    if not all(hasattr(backend, a) for a in ("name", "supports", "clip_stats", "clip_grads", "siglip_block")):
        raise ValueError(f"backend must be one of {BACKENDS} or a BlockKernels instance, got {backend!r}")
    return False


def get_backend(name: Union[str, BlockKernels], device: torch.device) -> BlockKernels:
    """Resolve a backend name (or a configured backend instance, e.g. ``TritonKernels(TritonConfig(...))``)
    for features on `device`.

    "auto" picks "triton" for CUDA tensors when Triton is importable, else "torch"; it never picks
    "dense". Asking for "triton" where it cannot run raises ValueError.
    """
    if not check_backend(name):
        assert not isinstance(name, str)
        if not name.supports(device):
            raise ValueError(f"backend {name.name!r} cannot run on features on {device}")
        return name
    if name == "torch":
        return TorchChunkedKernels()
    if name == "dense":
        return DenseKernels()
    if name == "auto":
        if auto_backend(device.type) == "triton":
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


__all__ = ["BACKENDS", "BlockKernels", "DenseKernels", "TorchChunkedKernels", "auto_backend", "check_backend",
           "get_backend"]
