"""Strategies: how the blocks of a (possibly distributed) contrastive batch meet.

A strategy exposes `clip(x, y, scale, kernels, group)` and `siglip(x, y, scale, bias, kernels, group)`
returning this rank's loss with autograd attached. It knows nothing of a kernel's insides.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, Optional

import torch.distributed as dist

STRATEGIES = ("auto", "local", "gather", "ring")


def _distributed(group: Optional["dist.ProcessGroup"]) -> bool:
    if group is not None:
        return True
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve(strategy: str, group: Optional["dist.ProcessGroup"]) -> str:
    """Validate a strategy name and turn "auto" into a concrete one."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if strategy == "auto":
        return "ring" if _distributed(group) else "local"
    if strategy != "local" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy={strategy!r} needs torch.distributed to be initialised (use 'local' or 'auto')")
    return strategy


def get(name: str) -> ModuleType:
    if name == "local":
        from . import local as module
    elif name == "gather":
        from . import gather as module
    else:
        from . import ring as module
    return module


@contextmanager
def validating(name: str, features: object, group: Optional["dist.ProcessGroup"]) -> Iterator[None]:
    """Run argument checks; under a distributed strategy a failure on one rank is first reported
    to the others (through the layout exchange they are about to enter), so they raise too instead
    of hanging, then re-raised here."""
    try:
        yield
    except (TypeError, ValueError):
        if name != "local":
            from ._comm import report_invalid

            report_invalid(features, group)
        raise
