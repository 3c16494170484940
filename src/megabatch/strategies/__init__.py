"""Strategies: how the blocks of a (possibly distributed) contrastive batch meet.

Every strategy implements one interface (base.py: visit every column block once, combine the
accumulators that travel with it): `local` (one visit), `gather` (all-gather, one visit, reduce to
the owners), `ring` (W visits round the ring) and `hierarchical` (a ring between nodes, an
all-gather within each: W / ranks_per_node visits of a node's block). They know nothing of the loss math or of a
kernel's insides; the loss families (megabatch.losses) drive them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.base import BlockKernels
from ._comm import Layout
from .base import Block, Strategy, Visit

# Every name a caller may pass (the losses, their modules, `megabatch bench`, `megabatch plan`, the app);
# "auto" is local on one process and, distributed, decided by the cost model at the call (auto.py).
STRATEGIES = ("auto", "local", "gather", "ring", "hierarchical")


def planned(name: str, world: int) -> str:
    """What `name` means for a batch spread over `world` ranks, before any call: "auto" is local on one
    rank and stays "auto" on several (the cost model decides it at the call, from every rank's sizes:
    auto.py); any other name is itself. ValueError for an unknown name. What a launcher passes on."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        return "auto" if world > 1 else "local"
    return name


def _world(group: Optional["dist.ProcessGroup"]) -> int:
    """Ranks the batch spans, as "auto" sees them: a group given explicitly always counts as several."""
    if group is not None:
        return 2
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve(strategy: str, group: Optional["dist.ProcessGroup"]) -> str:
    """Validate a strategy name (and the group) for a loss call: "auto" becomes "local" on one process and
    stays "auto" when distributed (decided in `create`)."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if strategy == "auto":
        return planned(strategy, _world(group))
    if strategy != "local" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy={strategy!r} needs torch.distributed to be initialised (use 'local' or 'auto')")
    return strategy


def ranks_per_node(name: str, value: Optional[int], group: Optional["dist.ProcessGroup"]) -> int:
    """hierarchical's R for a loss call: `value` if given (an int >= 1), else torchrun's LOCAL_WORLD_SIZE
    (checked: the node's ranks contiguous in the group); 0 for the other strategies, which take none.
    Local checks only (run them under `validating`); every rank's R is then agreed in the layout exchange."""
    from .hierarchical import check_ranks_per_node, env_ranks_per_node

    if name != "hierarchical":
        if value is not None:
            raise ValueError(f"ranks_per_node is only for strategy='hierarchical', got strategy={name!r}")
        return 0
    return env_ranks_per_node(group) if value is None else check_ranks_per_node(value)


@dataclass(frozen=True)
class StrategySpec:
    """How the blocks of one loss call meet: the strategy asked for and the settings only it reads.
    Built and validated once, by `make_spec`; everything below takes it as it is.

    name: "auto", "local", "gather", "ring" or "hierarchical".
    ranks_per_node: hierarchical's R (group rank i is on node i // R); 0 for the other strategies
        (and for "auto", which takes R from torchrun's LOCAL_WORLD_SIZE where it is valid).
    memory_budget: bytes a rank may spend on the loss's peak beyond its inputs, what "auto" plans with
        (None: the device's free memory at the call; every rank's are exchanged and the least is used);
        only "auto" reads it.
    """

    name: str = "auto"
    ranks_per_node: int = 0
    memory_budget: Optional[int] = None


def make_spec(strategy: object, group: Optional["dist.ProcessGroup"], *, ranks_per_node: Optional[int] = None,
              memory_budget: Optional[int] = None) -> StrategySpec:
    """The one validation of a strategy and its settings, for every front (ValueError/TypeError naming
    the argument). "auto" is "local" on one process; distributed it stays "auto" (decided in `create`)."""
    name = resolve(strategy, group)  # type: ignore[arg-type]
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes (int) or None, got {memory_budget!r}")
    return StrategySpec(name, _ranks_per_node(name, ranks_per_node, group), memory_budget)


_ranks_per_node = ranks_per_node  # make_spec's keyword shadows it


def create(
    spec: StrategySpec, x: Tensor, y: Tensor, extras: Sequence[Tensor], kernels: BlockKernels,
    group: Optional["dist.ProcessGroup"], *, loss: str, ids: bool, directions: int = 0,
    needs: Optional[Sequence[bool]] = None, compiled: bool = False,
) -> Strategy:
    """A strategy for one loss call. Distributed ones first agree with every rank of the group on
    the layout and on everything else that decides the collectives (one all_gather of metadata; see
    _comm.exchange_layout): the strategy, the loss ("clip" or "siglip"), ids, CLIP's directions,
    ranks_per_node, which inputs need gradients, and whether the call is compiled (a custom op); "auto"
    is then decided from that table (auto.py: the cost model's fastest strategy whose peak fits the least
    memory budget), the same on every rank, and the choice kept in the layout (`lay.strategy`, `lay.choice`).

    spec: the call's StrategySpec (make_spec).
    needs: which of (x, y, *extras) need gradients; None reads grad mode and requires_grad (the
    compiled path passes them, since inside a custom op the tensors no longer carry them)."""
    name, ranks_per_node, budget = spec.name, spec.ranks_per_node, spec.memory_budget
    if needs is None:
        needs = [torch.is_grad_enabled() and t.requires_grad for t in (x, y, *extras)]
    if name == "local":
        from .local import Local

        return Local(x.shape[0], y.shape[0], bool(needs[1]), ids)
    from ._comm import exchange_layout

    hints = {}
    if name == "auto":
        from . import auto

        hints = dict(ranks_per_node=auto.node_hint(group), budget=auto.local_budget(budget, x.device),
                     hardware=auto.hardware_code(x.device),
                     decide=lambda cols, fam: auto.decide(cols, kernels.name, x.device.type, fam, group_name(group)))
    lay = exchange_layout(x, y, extras, kernels, group, strategy=name, loss=loss, ids=ids, directions=directions,
                          needs=needs, compiled=compiled, **{"ranks_per_node": ranks_per_node, **hints})
    return from_layout(lay.strategy or name, lay)


def from_layout(name: str, lay: "Layout") -> Strategy:
    """The concrete strategy `name` ("local", "gather", "ring" or "hierarchical") over an already agreed
    layout (no communication): what the compiled backward rebuilds from the layout its forward returned
    (which records what "auto" chose)."""
    if name not in STRATEGIES or name == "auto":
        raise ValueError(f"from_layout needs a concrete strategy, got {name!r}")
    if name == "local":
        from .local import Local

        return Local(lay.sizes[0], lay.tsizes[0], lay.y_grad, lay.ids)
    if name == "gather":
        from .gather import Gather

        return Gather(lay)
    if name == "hierarchical":
        from .hierarchical import Hierarchical

        return Hierarchical(lay)
    from .ring import Ring

    return Ring(lay)


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


def group_name(group: Optional["dist.ProcessGroup"]) -> str:
    """A process group as a string a custom op can take ("" for None: the world group)."""
    return "" if group is None else group.group_name


def resolve_group(name: str) -> Optional["dist.ProcessGroup"]:
    """The inverse of `group_name`."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def strategy_code(name: str) -> int:
    """A concrete distributed strategy as an int (the compiled layout's row 2); `strategy_name` inverts it."""
    from ._comm import _STRATEGY_CODES

    return _STRATEGY_CODES.index(name)


def strategy_name(code: int) -> str:
    from ._comm import _STRATEGY_CODES

    return _STRATEGY_CODES[code]


__all__ = ["Block", "Layout", "STRATEGIES", "Strategy", "StrategySpec", "Visit", "create", "make_spec", "from_layout", "strategy_code", "strategy_name", "group_name",
           "planned", "ranks_per_node", "resolve", "resolve_group", "validating"]
