"""The losses as `torch.library` custom ops, so that torch.compile traces them without a graph break.

What dynamo cannot trace -- the Triton kernels, and the distributed strategies' size exchange (a
host read) and collectives -- runs inside opaque ops whose fake implementations know every output
shape from the inputs alone (everything they return is local-sized), so compiling never
communicates. The eager engine runs unchanged inside them:

  megabatch::clip_forward   (x, y, scale, ids...) -> loss and the statistics the backward needs:
                            row/column log-sum-exps and positive counts ((b,), (n,) float64), the
                            weights (w_r, w_c) (2,) float64, and the agreed layout (3, W) int64
                            (every rank's image and text counts, and the strategy the forward ran;
                            on the CPU when distributed).
  megabatch::clip_backward  those + the upstream gradient -> (dx, dy, dscale) (empty where not
                            wanted). It rebuilds the strategy from the layout: no second size
                            exchange; `gather` all-gathers the texts again (eager keeps them).
  megabatch::siglip_forward (x, y, scale, bias, ids...) -> loss and, when gradients are wanted,
                            (dx, dy, dscale_sum, dbias_sum) computed in the same pass (as eager);
                            its backward is plain tensor code (a multiply), traced by AOTAutograd.

The spec travels as ints, strings and bools (LossSpec.op_args / from_op in options.py: the
strategy's name, ranks per node and memory budget (-1: None) as three arguments, the process group
by name, "" for the world group; the backend by name, or a configured backend instance by a key,
see `backend_key`). Each op body reads them back into a LossSpec and calls the same family
functions as the eager road (clip_forward, clip_backward, siglip_forward), so the two roads share
everything but the schema. `clip` and `siglip` below are what megabatch.functional calls while
dynamo is tracing, with the eager road's arguments; eager calls never come here (no dispatcher
overhead).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .._numerics import compute_dtype, scalar_grad
from .clip import ClipSaved, clip_backward, clip_forward
from .options import Features, LossSpec, backend_key
from .siglip import siglip_forward

__all__ = ["backend_key", "clip", "siglip"]


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
                    direction: int, strategy: str, ranks_per_node: int, memory_budget: int, group: str,
                    backend: str, needs: Sequence[bool]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = LossSpec.from_op("clip", strategy, ranks_per_node, memory_budget, group, backend, x.device,
                            direction=direction, ids=image_ids is not None, needs=needs)
    loss, saved, strat = clip_forward(spec, Features(x, y, image_ids, text_ids), scale)
    return (loss, *(_own(t) for t in saved.packed(x.device)), spec.layout(strat, x.device))


@clip_forward_op.register_fake
def _(x, y, scale, image_ids, text_ids, direction, strategy, ranks_per_node, memory_budget, group, backend, needs):
    f64 = dict(dtype=torch.float64, device=x.device)
    b, n = x.shape[0], y.shape[0]
    spec = LossSpec.from_op("clip", strategy, ranks_per_node, memory_budget, group, backend, x.device)
    return (x.new_empty((), dtype=compute_dtype(x.dtype)), x.new_empty(b, **f64), x.new_empty(n, **f64),
            x.new_empty(b, **f64), x.new_empty(n, **f64), x.new_empty(2, **f64), spec.empty_layout(x.device))


@torch.library.custom_op("megabatch::clip_backward", mutates_args=())
def clip_backward_op(grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, image_ids: Optional[Tensor],
                     text_ids: Optional[Tensor], row_lse: Tensor, col_lse: Tensor, row_cnt: Tensor, col_cnt: Tensor,
                     weights: Tensor, layout: Tensor, direction: int, strategy: str, ranks_per_node: int,
                     memory_budget: int, group: str, backend: str, needs: Sequence[bool]
                     ) -> tuple[Tensor, Tensor, Tensor]:
    spec = LossSpec.from_op("clip", strategy, ranks_per_node, memory_budget, group, backend, x.device,
                            direction=direction, ids=image_ids is not None, needs=needs)
    saved = ClipSaved.unpacked(row_lse, col_lse, row_cnt, col_cnt, weights)
    grads = clip_backward(spec, spec.resume(layout, needs[1]), Features(x, y, image_ids, text_ids), scale, saved,
                          grad, needs)
    return tuple(x.new_empty(0) if t is None else _own(t) for t in grads)


@clip_backward_op.register_fake
def _(grad, x, y, scale, image_ids, text_ids, row_lse, col_lse, row_cnt, col_cnt, weights, layout, direction,
      strategy, ranks_per_node, memory_budget, group, backend, needs):
    return (x.new_empty(x.shape) if needs[0] else x.new_empty(0), y.new_empty(y.shape) if needs[1] else x.new_empty(0),
            scale.new_empty(scale.shape) if needs[2] else x.new_empty(0))


def _clip_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, y, scale, xid, yid, *spec, _ = inputs  # spec: direction and op_args()
    ctx.save_for_backward(x, y, scale, xid, yid, *output[1:])
    ctx.spec = tuple(spec)


def _clip_grad(ctx: Any, grad: Tensor, *unused: Tensor) -> tuple[Optional[Tensor], ...]:
    needs = list(ctx.needs_input_grad[:3])
    dx, dy, ds = torch.ops.megabatch.clip_backward(grad, *ctx.saved_tensors, *ctx.spec, needs)
    grads = [g if need else None for g, need in zip((dx, dy, ds), needs)]
    return (*grads, None, None, *(None for _ in ctx.spec), None)  # ids, spec, needs


clip_forward_op.register_autograd(_clip_grad, setup_context=_clip_setup)


# ---- SigLIP -----------------------------------------------------------------------------------

@torch.library.custom_op("megabatch::siglip_forward", mutates_args=())
def siglip_forward_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, image_ids: Optional[Tensor],
                      text_ids: Optional[Tensor], strategy: str, ranks_per_node: int, memory_budget: int, group: str,
                      backend: str, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = LossSpec.from_op("siglip", strategy, ranks_per_node, memory_budget, group, backend, x.device,
                            ids=image_ids is not None, needs=needs)
    res = siglip_forward(spec, Features(x, y, image_ids, text_ids), scale, bias)
    if res.dx is None:
        cd = compute_dtype(x.dtype)
        return res.loss, x.new_empty(0), x.new_empty(0), x.new_zeros((), dtype=cd), x.new_zeros((), dtype=cd)
    assert res.dscale is not None and res.dbias is not None
    return res.loss, _own(res.dx), x.new_empty(0) if res.dy is None else _own(res.dy), res.dscale, res.dbias


@siglip_forward_op.register_fake
def _(x, y, scale, bias, image_ids, text_ids, strategy, ranks_per_node, memory_budget, group, backend, needs):
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
            scalar_grad(ctx.meta[1], g * gbias) if need[3] else None, *(None for _ in need[4:]))


siglip_forward_op.register_autograd(_siglip_grad, setup_context=_siglip_setup)


# ---- What megabatch.functional calls while dynamo traces: the eager road's arguments -------------

def clip(spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, xid: Optional[Tensor] = None,
         yid: Optional[Tensor] = None) -> Tensor:
    """This rank's CLIP loss through megabatch::clip_forward (see the module header)."""
    out = torch.ops.megabatch.clip_forward(x, y, scale, xid, yid, spec.direction, *spec.op_args(), list(spec.needs))
    return out[0]


def siglip(spec: LossSpec, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, xid: Optional[Tensor] = None,
           yid: Optional[Tensor] = None) -> Tensor:
    """This rank's SigLIP loss through megabatch::siglip_forward (see the module header)."""
    out = torch.ops.megabatch.siglip_forward(x, y, scale, bias, xid, yid, *spec.op_args(), list(spec.needs))
    return out[0]
