"""GradCache's micro-batch plumbing: cutting a batch (a tensor, or a mapping / tuple of tensors) into
micro-batches, calling an encoder on one, and the RNG and autocast state that lets a later call
replay an earlier one exactly (dropout, stochastic depth, mixed precision).

Nothing here knows about losses or process groups (megabatch/gradcache.py holds the algorithm).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

Batch = Union[Tensor, Mapping[str, Any], Sequence[Any]]
Encoder = Callable[..., Tensor]


def check_size(name: str, value: object, *, optional: bool = False) -> None:
    """A micro-batch size as the caller named it (`name`: micro_batch_size, mini_batch_size): a
    positive int (or None when `optional`). TypeError for a non-int, ValueError for a value < 1;
    GradCache and the integrations all check it here."""
    if optional and value is None:
        return
    expected = "None or a positive int" if optional else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be {expected}, got {value}")


def rows(batch: Batch) -> int:
    """Rows of a batch already checked by `batch_size` (its first tensor's dim 0)."""
    return next(leaves(batch)).shape[0]


def leaves(batch: Batch) -> Iterator[Tensor]:
    """Every tensor of a batch, depth first."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from leaves(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from leaves(v)


def batch_size(name: str, batch: Batch) -> int:
    """The batch's row count; TypeError/ValueError (naming `name`) unless every tensor has the same dim 0 > 0."""
    if not isinstance(batch, (Tensor, Mapping, tuple, list)):
        raise TypeError(f"{name} must be a tensor or a mapping/tuple of tensors, got {type(batch).__name__}")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in leaves(batch)}
    if not sizes:
        raise TypeError(f"{name} holds no tensor")
    if None in sizes:
        raise ValueError(f"{name} holds a 0-dim tensor; every tensor needs a leading batch dim")
    if len(sizes) > 1:
        raise ValueError(f"{name}'s tensors disagree on the batch size (dim 0): {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"{name} is an empty batch")
    return n


def slice_batch(batch: Any, a: int, b: int) -> Any:
    """Rows a..b of every tensor of the batch, in the batch's own structure (other values as they are)."""
    if isinstance(batch, Tensor):
        return batch[a:b]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, a, b) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, a, b) for v in batch)
    return batch


def encode(encoder: Encoder, chunk: Batch, name: str, rows: int) -> Tensor:
    """encoder(chunk), a mapping as keywords and a tuple/list as positional arguments; checks the output."""
    if isinstance(chunk, Mapping):
        out = encoder(**chunk)
    elif isinstance(chunk, (tuple, list)):
        out = encoder(*chunk)
    else:
        out = encoder(chunk)
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a (batch, dim) tensor, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(f"{name} returned shape {tuple(out.shape)} for a micro-batch of {rows}")
    return out


def cuda_devices(*batches: Batch) -> list[int]:
    """The CUDA devices whose RNG an encoder call may draw from: the batches' and the current one."""
    devices = {t.device.index for b in batches for t in leaves(b) if t.is_cuda}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


def rng_state(devices: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_rng_state(state: tuple[Tensor, list[Tensor]], devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def autocast_state() -> list[tuple[str, bool, torch.dtype, bool]]:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cache = torch.is_autocast_cache_enabled()
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d), cache) for d in kinds]


@contextlib.contextmanager
def autocast_as(state: list[tuple[str, bool, torch.dtype, bool]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype, cache in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield
