"""strategy="auto": decided inside `strategies.create`, right after the layout exchange, by the cost model
(megabatch.cost.choose) from the exchanged table, so every rank decides the same (a pure function of the
table). What each rank puts in the table for it, before the exchange:

  budget    bytes the loss's peak may take: the memory_budget the caller gave (StrategySpec), else the
            device's free memory (CUDA: torch.cuda.mem_get_info; CPU: /proc/meminfo's MemAvailable; -1, no
            limit, where neither says). The table's least is the budget.
  hardware  the device's profile (cost.PROFILES): a CUDA device by its name (H100, H200, A100; another GPU
            plans with cost.DEFAULT_GPU's rates), a CPU with cost.CPU (rough rates measured on this
            project's machine). Ranks that report different profiles use the first (slowest) listed.
  node      hierarchical's R where the rank knows it (torchrun's LOCAL_WORLD_SIZE, its node's ranks
            contiguous in the group), else 0; hierarchical is a candidate only where every rank reports
            the same R and it divides the group.

auto decides once per shape of call: the first call with a given group, sizes, D, dtype, loss, backend and
node size decides from its table (its budget: the free memory then), and later calls of that shape take the
same strategy (steps do not flip between strategies as free memory moves, and no step pays for the model
again). The choice is recorded in the Layout (`strategy`, `choice`); the compiled road's layout tensor carries
it to the backward (losses/options.py, row 2), which rebuilds that strategy with `from_layout`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from .. import cost

_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")  # _comm's dtype codes, in order
_BACKENDS = ("torch", "triton", "dense")  # the backends the model prices; another one is priced as torch


def local_budget(memory_budget: Optional[int], device: torch.device) -> int:
    """This rank's budget for the table: the one given, else the device's free memory (-1: unknown)."""
    if memory_budget is not None:
        return int(memory_budget)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return -1


def hardware_code(device: torch.device) -> int:
    """This rank's cost.PROFILES index."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return cost.PROFILES.index(cost.profile_of(name))


def node_hint(group: Optional["dist.ProcessGroup"]) -> int:
    """R from torchrun's environment where it is valid for this rank's place in the group, else 0."""
    from .hierarchical import env_ranks_per_node

    if os.environ.get("LOCAL_WORLD_SIZE") is None:
        return 0
    try:
        return env_ranks_per_node(group)
    except ValueError:
        return 0


_DECIDED: dict[tuple, cost.Choice] = {}  # decide's choices by shape of call
_KEEP = 256


def decide(cols: dict[str, list[int]], backend: str, device: str, loss: str, group: str = "") -> cost.Choice:
    """The choice for an exchanged table (already checked: the same sizes' columns on every rank): the one
    made for the first table of this shape in `group` (its sizes, D, dtype, ids, node size and hardware; not
    its budget, grad flags, directions or road, which the model does not price), else cost.choose's."""
    shape = tuple((c, tuple(cols[c])) for c in ("images", "texts", "dim", "dtype", "ids", "ranks_per_node", "hardware"))
    key = (group, backend, device, loss, shape, _roads_agree(cols, loss))
    if key not in _DECIDED:
        _DECIDED[key] = _choose(cols, backend, device, loss)
        while len(_DECIDED) > _KEEP:
            _DECIDED.pop(next(iter(_DECIDED)))
    return _DECIDED[key]


def _roads_agree(cols: dict[str, list[int]], loss: str) -> bool:
    """gather's CLIP backward differs by road: gather is a candidate only where every rank takes the same."""
    return len(set(cols["compiled"])) == 1 or loss != "clip" or not any(cols["grads"])


def _choose(cols: dict[str, list[int]], backend: str, device: str, loss: str) -> cost.Choice:
    world = len(cols["images"])
    sizes, tsizes = cols["images"], cols["texts"]
    base = cost.Shape(loss, "ring", backend if backend in _BACKENDS else "torch", world, max(sizes), max(tsizes),
                      sum(tsizes), cols["dim"][0], _DTYPE_NAMES[cols["dtype"][0]],
                      "cuda" if device == "cuda" else "cpu", bool(cols["ids"][0]), min(tsizes))
    known = [b for b in cols["budget"] if b >= 0]
    rpn = cols["ranks_per_node"]
    node = rpn[0] if len(set(rpn)) == 1 and rpn[0] >= 1 and world % rpn[0] == 0 else 0
    hw = cost.profile(cost.PROFILES[min(cols["hardware"])])
    return cost.choose(base, hw, min(known) if known else None, ranks_per_node=node, gather=_roads_agree(cols, loss))
