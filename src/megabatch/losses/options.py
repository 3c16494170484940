"""One loss call's options, built once and handed down whichever road the call takes.

megabatch.functional resolves the arguments into a `LossOptions` (strategy, backend, group, CLIP's
directions, whether positives come as ids, which inputs need gradients) and passes it, with the
tensors, to either road:
  eager     losses.clip / losses.siglip (one autograd.Function per family), and
  compiled  losses.ops.clip / losses.ops.siglip, the torch.library custom ops that dynamo sees.
Both end in the same functions of the families (clip_forward, clip_backward, siglip_forward), which
take the options, start (or resume) the strategy from them and call the kernels they name. The only
difference is the custom ops' schema, which takes tensors, ints, strings and bools: `op_args` writes
the options that way and `from_op` reads them back (the process group by name, a configured backend
instance by a key under which it is kept, see `backend_key`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

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
class LossOptions:
    """Everything about one loss call that is not a tensor.

    strategy: the concrete strategy ("local", "gather", "ring" or "hierarchical"; "auto" already resolved).
    kernels: the block kernels (a backend instance).
    needs: which of (x, y, scale[, bias]) need gradients, read when the call was made (`needs_grad`;
        inside an autograd.Function or a custom op the tensors no longer say).
    group: the process group (None: the world group; unused by "local").
    direction: CLIP's directions code (losses.clip.DIRECTIONS; 0 for SigLIP).
    ids: whether positives are given by image/text ids.
    configured: whether `kernels` is an instance the caller passed (the custom ops name it by a
        `backend_key`), rather than one made from a backend name.
    ranks_per_node: hierarchical's R (strategies.ranks_per_node; 0 for the other strategies). The
        custom ops carry it in the strategy string ("hierarchical:R").
    """

    strategy: str
    kernels: BlockKernels
    needs: tuple[bool, ...]
    group: Optional["dist.ProcessGroup"] = None
    direction: int = 0
    ids: bool = False
    configured: bool = False
    ranks_per_node: int = 0

    @property
    def opaque(self) -> bool:
        """While dynamo traces: whether the loss must run as a custom op rather than be traced --
        distributed strategies (host reads, collectives) and kernels other than the torch/dense ones
        (Triton). Eager calls always take the direct road (no dispatcher overhead)."""
        if not torch.compiler.is_compiling():
            return False
        return self.strategy != "local" or not isinstance(self.kernels, (TorchChunkedKernels, DenseKernels))

    # ---- the strategy ----------------------------------------------------------------------------

    def start(self, x: Tensor, y: Tensor, extras: Sequence[Tensor]) -> strategies.Strategy:
        """The strategy for this call; a distributed one first agrees on the layout with every rank
        (one all_gather of metadata)."""
        return strategies.create(self.strategy, x, y, extras, self.kernels, self.group, ids=self.ids,
                                 directions=self.direction, needs=list(self.needs),
                                 ranks_per_node=self.ranks_per_node)

    def layout(self, strat: strategies.Strategy, device: torch.device) -> Tensor:
        """The agreed layout as a (2, W) int64 tensor (every rank's image and text counts), on the CPU
        when distributed: the compiled backward reads it on the host to `resume` the strategy."""
        return torch.tensor([strat.lay.sizes, strat.lay.tsizes], dtype=torch.int64, device=self._layout_device(device))

    def empty_layout(self, device: torch.device) -> Tensor:
        """What `layout` returns, without values (the custom ops' fake implementations)."""
        world = 1 if self.strategy == "local" else dist.get_world_size(self.group)
        return torch.empty(2, world, dtype=torch.int64, device=self._layout_device(device))

    def resume(self, layout: Tensor, y_grad: bool) -> strategies.Strategy:
        """The strategy again, from the layout its forward returned: no second size exchange."""
        sizes, tsizes = (tuple(row) for row in layout.tolist())
        pg, rank = self.group, 0
        if self.strategy != "local":
            pg = pg if pg is not None else dist.group.WORLD
            rank = dist.get_rank(pg)
        return strategies.from_layout(self.strategy, strategies.Layout(pg, rank, sizes, tsizes, y_grad, self.ids,
                                                                           self.ranks_per_node))

    def _layout_device(self, device: torch.device) -> torch.device:
        return device if self.strategy == "local" else torch.device("cpu")

    # ---- as the custom ops carry them ------------------------------------------------------------

    def op_args(self) -> tuple[str, str, str]:
        """(strategy, group name, backend) as the custom ops' schema takes them; `from_op` reads them."""
        backend = backend_key(self.kernels) if self.configured else self.kernels.name
        strategy = f"{self.strategy}:{self.ranks_per_node}" if self.ranks_per_node else self.strategy
        return strategy, strategies.group_name(self.group), backend

    @staticmethod
    def from_op(strategy: str, group: str, backend: str, device: torch.device, *, direction: int = 0,
                ids: bool = False, needs: Sequence[bool] = ()) -> "LossOptions":
        """The options a custom op was called with (`op_args` plus its other arguments)."""
        kernels = _KERNELS[backend] if backend in _KERNELS else get_backend(backend, device)
        name, _, rpn = strategy.partition(":")
        return LossOptions(name, kernels, tuple(needs), strategies.resolve_group(group), direction, ids,
                           configured=backend in _KERNELS, ranks_per_node=int(rpn or 0))
