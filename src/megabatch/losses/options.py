"""One loss call's spec, built and validated once and handed down whichever road the call takes.

megabatch.spec builds a `LossSpec` (the family, how its blocks meet -- a strategies.StrategySpec --,
the kernels, the group, CLIP's directions, whether positives come as ids, which inputs need
gradients) and passes it, with the tensors, to either road:
  eager     losses.clip / losses.siglip (one autograd.Function per family), and
  compiled  losses.ops.clip / losses.ops.siglip, the torch.library custom ops that dynamo sees.
Both end in the same functions of the families (clip_forward, clip_backward, siglip_forward), which
take the spec, start (or resume) the strategy from it and call the kernels it names. Nothing below
validates it again. The only difference is the custom ops' schema, which takes tensors, ints,
strings and bools: `op_args` writes the spec that way (the strategy's name, ranks per node and
memory budget as three arguments, the process group by name, a configured backend instance by a key
under which it is kept, see `backend_key`) and `from_op` reads it back, marked `compiled`, so the
layout exchange sees the same spec whichever road a call takes, plus that one flag (gather's CLIP
backward differs by road).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import strategies
from ..kernels import DenseKernels, TorchChunkedKernels, get_backend
from ..kernels.base import BlockKernels

LOSSES = ("clip", "siglip")

# Configured backend instances (e.g. TritonKernels(TritonConfig(...))) by key; see backend_key.
_KERNELS: dict[str, BlockKernels] = {}


def _constant_result(fn):
    """torch.compiler.assume_constant_result, which only sets this mark on `fn` (torch/_dynamo/
    decorators.py), without its `import torch._dynamo`: that import costs every process that imports
    megabatch about as much CPU as `import torch` itself (~4 s on 2 CI cores), and eager code never
    needs dynamo. tests/test_compile.py checks that torch's decorator still marks a function exactly
    so, and that dynamo honours the mark (a configured backend under fullgraph=True)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def backend_key(kernels: BlockKernels) -> str:
    """The string a custom op gets for a backend instance the caller configured (e.g.
    ``TritonKernels(TritonConfig(...))``): a key under which the instance is kept for the process's
    life. Dynamo calls this once while tracing (the key is a constant of the graph)."""
    key = f"{kernels.name}#{id(kernels)}"
    _KERNELS.setdefault(key, kernels)
    return key


class Features(NamedTuple):
    """One call's feature tensors: this rank's images x (b, D) and texts y (n, D), and their ids ((b,)
    and (n,) int64, contiguous) or None (index positives)."""

    x: Tensor
    y: Tensor
    xid: Optional[Tensor] = None
    yid: Optional[Tensor] = None


def needs_grad(*tensors: Tensor) -> tuple[bool, ...]:
    """Which of the tensors need a gradient from this call (grad mode on, and requires_grad)."""
    return tuple(torch.is_grad_enabled() and t.requires_grad for t in tensors)


@dataclass(frozen=True)
class LossSpec:
    """Everything about one loss call that is not a tensor (built by megabatch.spec.loss_spec).

    family: "clip" or "siglip".
    strategy: how the blocks meet, as strategies.make_spec built it (its name, hierarchical's ranks
        per node, auto's memory budget).
    backend: the backend as named ("torch", "triton", "dense"; "auto" already resolved for the
        features' device) or the configured instance the caller passed (e.g.
        ``TritonKernels(TritonConfig(...))``).
    kernels: the block kernels `backend` resolved to, once (kernels.get_backend); the instance
        itself when one was passed.
    needs: which of (x, y, scale[, bias]) need gradients, read when the call was made (`needs_grad`;
        inside an autograd.Function or a custom op the tensors no longer say).
    group: the process group (None: the world group; unused by "local").
    direction: CLIP's directions code (losses.clip.DIRECTIONS; 0 for SigLIP).
    ids: whether positives are given by image/text ids.
    compiled: whether the call takes the compiled road (a custom op; `from_op` sets it). The layout
        exchange carries it: gather's compiled CLIP backward gathers the texts again, the eager one
        keeps them.
    """

    family: str
    strategy: strategies.StrategySpec
    backend: Union[str, BlockKernels]
    kernels: BlockKernels
    needs: tuple[bool, ...]
    group: Optional["dist.ProcessGroup"] = None
    direction: int = 0
    ids: bool = False
    compiled: bool = False

    @property
    def distributed(self) -> bool:
        """Whether the call's strategy spans ranks (anything but "local")."""
        return self.strategy.name != "local"

    @property
    def opaque(self) -> bool:
        """While dynamo traces: whether the loss must run as a custom op rather than be traced --
        distributed strategies (host reads, collectives) and kernels other than the torch/dense ones
        (Triton). Eager calls always take the direct road (no dispatcher overhead)."""
        if not torch.compiler.is_compiling():
            return False
        return self.distributed or not isinstance(self.kernels, (TorchChunkedKernels, DenseKernels))

    # ---- the strategy ----------------------------------------------------------------------------

    def start(self, x: Tensor, y: Tensor, extras: Sequence[Tensor]) -> strategies.Strategy:
        """The strategy for this call; a distributed one first agrees on the layout and this spec with
        every rank (one all_gather of metadata). The one place the spec meets strategies.create."""
        return strategies.create(self.strategy, x, y, extras, self.kernels, self.group, loss=self.family,
                                 ids=self.ids, directions=self.direction, needs=list(self.needs),
                                 compiled=self.compiled)

    def layout(self, strat: strategies.Strategy, device: torch.device) -> Tensor:
        """The agreed layout as a (3, W) int64 tensor, on the CPU when distributed: every rank's image
        counts, their text counts, and the concrete strategy with its R (row 2: [code, R, 0, ...], what
        "auto" chose). The compiled backward reads it on the host to `resume` the strategy."""
        lay = strat.lay
        pick = [0] * len(lay.sizes)
        if self.distributed:
            pick[:2] = [strategies.strategy_code(lay.strategy or self.strategy.name), lay.ranks_per_node]
        return torch.tensor([lay.sizes, lay.tsizes, pick], dtype=torch.int64, device=self._layout_device(device))

    def empty_layout(self, device: torch.device) -> Tensor:
        """What `layout` returns, without values (the custom ops' fake implementations)."""
        world = dist.get_world_size(self.group) if self.distributed else 1
        return torch.empty(3, world, dtype=torch.int64, device=self._layout_device(device))

    def resume(self, layout: Tensor, y_grad: bool) -> strategies.Strategy:
        """The strategy again, from the layout its forward returned: no second size exchange, and the
        strategy the forward ran (auto's pick included)."""
        sizes, tsizes, pick = (tuple(row) for row in layout.tolist())
        name, pg, rank, rpn = "local", self.group, 0, 0
        if self.distributed:
            pg = pg if pg is not None else dist.group.WORLD
            rank = dist.get_rank(pg)
            name, rpn = strategies.strategy_name(pick[0]), pick[1]
        return strategies.from_layout(name, strategies.Layout(pg, rank, sizes, tsizes, y_grad, self.ids, rpn, name))

    def _layout_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.distributed else device

    # ---- as the custom ops carry it --------------------------------------------------------------

    def op_args(self) -> tuple[str, int, int, str, str]:
        """(strategy, ranks_per_node, memory_budget (-1: None), group name, backend) as the custom ops'
        schema takes them; `from_op` reads them back."""
        backend = self.backend if isinstance(self.backend, str) else backend_key(self.backend)
        st = self.strategy
        budget = -1 if st.memory_budget is None else st.memory_budget
        return st.name, st.ranks_per_node, budget, strategies.group_name(self.group), backend

    @staticmethod
    def from_op(family: str, strategy: str, ranks_per_node: int, memory_budget: int, group: str, backend: str,
                device: torch.device, *, direction: int = 0, ids: bool = False,
                needs: Sequence[bool] = ()) -> "LossSpec":
        """The spec a custom op was called with (`op_args` plus its other arguments). Read back, not
        validated again: `op_args` wrote a spec strategies.make_spec had built."""
        configured = _KERNELS.get(backend)
        kernels = configured if configured is not None else get_backend(backend, device)
        st = strategies.StrategySpec(strategy, ranks_per_node, None if memory_budget < 0 else memory_budget)
        return LossSpec(family, st, backend if configured is None else configured, kernels, tuple(needs),
                        strategies.resolve_group(group), direction, ids, compiled=True)
