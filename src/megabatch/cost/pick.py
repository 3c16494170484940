"""What strategy="auto" picks: the strategy the time model predicts fastest among those whose predicted peak
fits a memory budget. One function, `choose`, for the losses (strategies.create, from the layout exchange's
table, the same on every rank) and for `megabatch plan` (from the command's sizes): the same answer for the
same sizes, with its reason and the table of candidates it weighed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

from .terms import Shape, memory_terms
from .time import CPU, GPUS, Hardware, step_time

# The hardware profiles a rank can report in the layout exchange (its `hardware` column: an index here),
# slowest first: ranks that report different ones all plan with the first of them.
PROFILES = ("A100", "H100", "H200", "CPU")
DEFAULT_GPU = "H100"  # a CUDA device whose name matches no preset plans with the H100's rates


def profile_of(device_name: Optional[str]) -> str:
    """The profile of a device: a CUDA device name ("NVIDIA H200", "NVIDIA A100-SXM4-80GB") -> the preset it
    names, DEFAULT_GPU if none; None (a CPU) -> "CPU"."""
    if device_name is None:
        return "CPU"
    upper = device_name.upper()
    return next((name for name in GPUS if name in upper), DEFAULT_GPU)


def profile(name: str) -> Hardware:
    """A profile's rates (cost.time.GPUS, or cost.time.CPU)."""
    return CPU if name == "CPU" else GPUS[name]


@dataclass(frozen=True)
class Candidate:
    """One strategy as `choose` weighed it: its predicted peak (bytes beyond the inputs, cost.terms), step
    time (seconds, cost.time) and whether the peak fits the budget."""

    strategy: str
    peak_bytes: int
    time_s: float
    fits: bool


@dataclass(frozen=True)
class Choice:
    """What "auto" picks (`strategy`; `ranks_per_node` is hierarchical's R, else 0), why (`reason`, one
    sentence), and every candidate it weighed, in the order it weighs them."""

    strategy: str
    reason: str
    candidates: tuple[Candidate, ...]
    hardware: str
    budget: Optional[int]
    ranks_per_node: int = 0


def candidates(world: int, ranks_per_node: int = 0, gather: bool = True) -> tuple[str, ...]:
    """The strategies "auto" weighs, in the order ties go: local on one rank; ring, gather and, where R is
    known and the world is whole nodes of R, hierarchical on several. gather=False leaves gather out."""
    if world == 1:
        return ("local",)
    out = ("ring",) + (("gather",) if gather else ())
    return out + (("hierarchical",) if ranks_per_node >= 1 and world % ranks_per_node == 0 else ())


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose(base: Shape, hw: Hardware, budget: Optional[int] = None, *, ranks_per_node: int = 0,
           gather: bool = True) -> Choice:
    """The strategy "auto" picks for `base` (its strategy field is ignored; its node is replaced by
    ranks_per_node): the least predicted step time among the candidates whose peak is at most `budget`
    bytes (None: no limit); if none fits, the one with the least peak. Ties go to the earlier candidate.
    ranks_per_node: hierarchical's R where it is known (0: not a candidate); it also sets the hardware's
    node size. Pure: the same arguments give the same answer on every rank."""
    if ranks_per_node >= 1:
        hw = replace(hw, ranks_per_node=ranks_per_node)
    rows = [Candidate(name, peak, t, budget is None or peak <= budget)
            for name, peak, t in _weigh(replace(base, strategy="ring", node=1), hw, ranks_per_node, gather)]
    fit = [c for c in rows if c.fits]
    if len(rows) == 1:
        pick, why = rows[0], "one rank: nothing to exchange"
    elif fit:
        pick = min(fit, key=lambda c: (c.time_s, rows.index(c)))
        out = [c for c in rows if not c.fits]
        others = ", ".join(f"{c.strategy} {1e3 * c.time_s:.3g} ms" for c in rows if c is not pick)
        why = (f"the fastest predicted {'of those that fit ' if out else ''}on {hw.name} rates "
               f"({1e3 * pick.time_s:.3g} ms a step; {others})")
        if out:
            why += "; " + ", ".join(f"{c.strategy}'s peak {_mib(c.peak_bytes)}" for c in out) + \
                   f" over the memory budget of {_mib(budget or 0)}"
        elif budget is not None:
            why += f"; every peak within the memory budget of {_mib(budget)}"
    else:
        pick = min(rows, key=lambda c: (c.peak_bytes, rows.index(c)))
        why = (f"no candidate's peak fits the memory budget of {_mib(budget or 0)}: the least peak "
               f"({_mib(pick.peak_bytes)})")
    rpn = ranks_per_node if pick.strategy == "hierarchical" else 0
    return Choice(pick.strategy, f"{pick.strategy}: {why}", tuple(rows), hw.name, budget, rpn)


@lru_cache(maxsize=256)
def _weigh(base: Shape, hw: Hardware, ranks_per_node: int, gather: bool) -> tuple[tuple[str, int, float], ...]:
    """(strategy, peak bytes, step seconds) of each candidate: kept, since a loss call's sizes repeat from
    step to step and only its free memory (the budget) moves."""
    out = []
    for name in candidates(base.world, ranks_per_node, gather):
        s = replace(base, strategy=name, node=ranks_per_node if name == "hierarchical" else 1)
        out.append((name, int(sum(memory_terms(s).values())), step_time(s, hw)["time_s"]))
    return tuple(out)
