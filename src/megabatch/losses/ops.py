"""The losses as `torch.library` custom ops, so that torch.compile traces them without a graph break.

What dynamo cannot trace -- the Triton kernels, and the distributed strategies' size exchange (a
host read) and collectives -- runs inside opaque ops whose fake implementations know every output
shape from the inputs alone (everything they return is local-sized), so compiling never
communicates. The eager engine runs unchanged inside them:

  megabatch::clip_forward   (x, y, scale, ids...) -> loss and the statistics the backward needs:
                            row/column log-sum-exps and positive counts ((b,), (n,) float64), the
                            weights (w_r, w_c) (2,) float64, and the agreed layout (2, W) int64
                            (every rank's image and text counts; on the CPU when distributed).
  megabatch::clip_backward  those + the upstream gradient -> (dx, dy, dscale) (empty where not
                            wanted). It rebuilds the strategy from the layout: no second size
                            exchange; `gather` all-gathers the texts again (eager keeps them).
  megabatch::siglip_forward (x, y, scale, bias, ids...) -> loss and, when gradients are wanted,
                            (dx, dy, dscale_sum, dbias_sum) computed in the same pass (as eager);
                            its backward is plain tensor code (a multiply), traced by AOTAutograd.

Options travel as ints, strings and bools: the process group by name ("" is the world group), the
backend by name (a configured backend instance is registered under a key, see `backend_key`).
`clip` and `siglip` below are what megabatch.functional calls while dynamo is tracing; eager calls
never come here (no dispatcher overhead).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import strategies
from .._numerics import compute_dtype, scalar_grad
from ..kernels import get_backend
from ..kernels.base import BlockKernels
from .clip import ClipSaved, clip_backward, clip_forward
from .siglip import siglip_forward

# Configured backend instances (e.g. TritonKernels(TritonConfig(...))) by key; see backend_key.
_KERNELS: dict[str, BlockKernels] = {}


@torch.compiler.assume_constant_result
def backend_key(kernels: BlockKernels) -> str:
    """The string a custom op gets for a backend instance the caller configured (e.g.
    ``TritonKernels(TritonConfig(...))``): a key under which the instance is kept for the process's
    life. Dynamo calls this once while tracing (the key is a constant of the graph)."""
    key = f"{kernels.name}#{id(kernels)}"
    _KERNELS.setdefault(key, kernels)
    return key


def _kernels(key: str, device: torch.device) -> BlockKernels:
    return _KERNELS[key] if key in _KERNELS else get_backend(key, device)


def _world(strategy: str, group: str) -> int:
    return 1 if strategy == "local" else dist.get_world_size(strategies.resolve_group(group))


def _layout_tensor(lay: strategies.Layout, strategy: str, device: torch.device) -> Tensor:
    on = device if strategy == "local" else torch.device("cpu")  # read on the host by the backward
    return torch.tensor([lay.sizes, lay.tsizes], dtype=torch.int64, device=on)


def _empty_layout(strategy: str, group: str, device: torch.device) -> Tensor:
    on = device if strategy == "local" else torch.device("cpu")
    return torch.empty(2, _world(strategy, group), dtype=torch.int64, device=on)


def _strategy(strategy: str, group: str, layout: Tensor, y_grad: bool, ids: bool) -> strategies.Strategy:
    sizes, tsizes = (tuple(row) for row in layout.tolist())
    pg = strategies.resolve_group(group)
    if strategy != "local":
        pg = pg if pg is not None else dist.group.WORLD
    rank = 0 if strategy == "local" else dist.get_rank(pg)
    return strategies.from_layout(strategy, strategies.Layout(pg, rank, sizes, tsizes, y_grad, ids))


def _own(t: Tensor) -> Tensor:
    """A custom op's outputs may not alias its inputs nor each other, and must be laid out as the
    fake implementation says (contiguous, own storage): a view is copied (gather's slice of the
    reduced text gradients, the statistics' slices), anything else passes as it is."""
    if t._base is None and t.storage_offset() == 0 and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)


# ---- CLIP -------------------------------------------------------------------------------------

@torch.library.custom_op("megabatch::clip_forward", mutates_args=())
def clip_forward_op(x: Tensor, y: Tensor, scale: Tensor, image_ids: Optional[Tensor], text_ids: Optional[Tensor],
                    direction: int, strategy: str, group: str, backend: str, needs: Sequence[bool]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels(backend, x.device)
    strat = strategies.create(strategy, x, y, (scale,), kernels, strategies.resolve_group(group),
                              ids=image_ids is not None, directions=direction, needs=list(needs))
    loss, saved = clip_forward(x, y, scale, strat, kernels, image_ids, text_ids, direction)
    weights = torch.stack([torch.as_tensor(w, dtype=torch.float64, device=x.device) for w in saved.weights])
    stats = [_own(t) for t in (saved.row_lse, saved.col_lse, saved.row_cnt, saved.col_cnt)]
    return (loss, *stats, weights, _layout_tensor(strat.lay, strategy, x.device))


@clip_forward_op.register_fake
def _(x, y, scale, image_ids, text_ids, direction, strategy, group, backend, needs):
    f64 = dict(dtype=torch.float64, device=x.device)
    b, n = x.shape[0], y.shape[0]
    return (x.new_empty((), dtype=compute_dtype(x.dtype)), x.new_empty(b, **f64), x.new_empty(n, **f64),
            x.new_empty(b, **f64), x.new_empty(n, **f64), x.new_empty(2, **f64),
            _empty_layout(strategy, group, x.device))


@torch.library.custom_op("megabatch::clip_backward", mutates_args=())
def clip_backward_op(grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, image_ids: Optional[Tensor],
                     text_ids: Optional[Tensor], row_lse: Tensor, col_lse: Tensor, row_cnt: Tensor, col_cnt: Tensor,
                     weights: Tensor, layout: Tensor, direction: int, strategy: str, group: str, backend: str,
                     needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    strat = _strategy(strategy, group, layout, needs[1], image_ids is not None)
    saved = ClipSaved(row_lse, col_lse, row_cnt, col_cnt, (weights[0], weights[1]))
    dx, dy, ds = clip_backward(x, y, scale, strat, _kernels(backend, x.device), image_ids, text_ids, direction,
                               saved, grad, needs)
    return tuple(x.new_empty(0) if t is None else _own(t) for t in (dx, dy, ds))


@clip_backward_op.register_fake
def _(grad, x, y, scale, image_ids, text_ids, row_lse, col_lse, row_cnt, col_cnt, weights, layout, direction,
      strategy, group, backend, needs):
    return (x.new_empty(x.shape) if needs[0] else x.new_empty(0), y.new_empty(y.shape) if needs[1] else x.new_empty(0),
            scale.new_empty(scale.shape) if needs[2] else x.new_empty(0))


def _clip_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, y, scale, xid, yid, direction, strategy, group, backend, _ = inputs
    ctx.save_for_backward(x, y, scale, xid, yid, *output[1:])
    ctx.opts = (direction, strategy, group, backend)


def _clip_grad(ctx: Any, grad: Tensor, *unused: Tensor) -> tuple[Optional[Tensor], ...]:
    needs = list(ctx.needs_input_grad[:3])
    dx, dy, ds = torch.ops.megabatch.clip_backward(grad, *ctx.saved_tensors, *ctx.opts, needs)
    grads = [g if need else None for g, need in zip((dx, dy, ds), needs)]
    return (*grads, None, None, None, None, None, None, None)


clip_forward_op.register_autograd(_clip_grad, setup_context=_clip_setup)


# ---- SigLIP -----------------------------------------------------------------------------------

@torch.library.custom_op("megabatch::siglip_forward", mutates_args=())
def siglip_forward_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, image_ids: Optional[Tensor],
                      text_ids: Optional[Tensor], strategy: str, group: str, backend: str, needs: Sequence[bool]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels(backend, x.device)
    strat = strategies.create(strategy, x, y, (scale, bias), kernels, strategies.resolve_group(group),
                              ids=image_ids is not None, needs=list(needs))
    loss, grads = siglip_forward(x, y, scale, bias, strat, kernels, image_ids, text_ids, any(needs))
    if grads is None:
        cd = compute_dtype(x.dtype)
        return loss, x.new_empty(0), x.new_empty(0), x.new_zeros((), dtype=cd), x.new_zeros((), dtype=cd)
    dx, dy, gscale, gbias = grads
    return loss, _own(dx), x.new_empty(0) if dy is None else _own(dy), gscale, gbias


@siglip_forward_op.register_fake
def _(x, y, scale, bias, image_ids, text_ids, strategy, group, backend, needs):
    cd = compute_dtype(x.dtype)
    want = any(needs)
    return (x.new_empty((), dtype=cd), x.new_empty(x.shape) if want else x.new_empty(0),
            y.new_empty(y.shape) if want and needs[1] else x.new_empty(0), x.new_empty((), dtype=cd),
            x.new_empty((), dtype=cd))


def _siglip_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    scale, bias = inputs[2], inputs[3]
    ctx.save_for_backward(*output[1:])
    ctx.meta = [(scale.shape, scale.dtype), (bias.shape, bias.dtype)]


def _siglip_grad(ctx: Any, grad: Tensor, *unused: Tensor) -> tuple[Optional[Tensor], ...]:
    dx, dy, gscale, gbias = ctx.saved_tensors
    g = grad.to(gscale.dtype)
    need = ctx.needs_input_grad
    return (dx * g.to(dx.dtype) if need[0] else None, dy * g.to(dy.dtype) if need[1] else None,
            scalar_grad(ctx.meta[0], g * gscale) if need[2] else None,
            scalar_grad(ctx.meta[1], g * gbias) if need[3] else None, None, None, None, None, None, None)


siglip_forward_op.register_autograd(_siglip_grad, setup_context=_siglip_setup)


# ---- What megabatch.functional calls while dynamo traces ---------------------------------------

def _needs(*tensors: Tensor) -> list[bool]:
    return [torch.is_grad_enabled() and t.requires_grad for t in tensors]


def clip(x: Tensor, y: Tensor, scale: Tensor, xid: Optional[Tensor], yid: Optional[Tensor], direction: int,
         strategy: str, group: Optional["dist.ProcessGroup"], backend: str) -> Tensor:
    """This rank's CLIP loss through megabatch::clip_forward (see the module header); `backend` a
    backend name or a `backend_key`."""
    out = torch.ops.megabatch.clip_forward(x, y, scale, xid, yid, direction, strategy, strategies.group_name(group),
                                           backend, _needs(x, y, scale))
    return out[0]


def siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, xid: Optional[Tensor], yid: Optional[Tensor],
           strategy: str, group: Optional["dist.ProcessGroup"], backend: str) -> Tensor:
    """This rank's SigLIP loss through megabatch::siglip_forward (see the module header)."""
    out = torch.ops.megabatch.siglip_forward(x, y, scale, bias, xid, yid, strategy, strategies.group_name(group),
                                             backend, _needs(x, y, scale, bias))
    return out[0]
