"""Numerics shared by the loss families: the compute dtype, autocast off, finishing the row side of
a gradient, and SigLIP's stash/replay of gradients computed in the forward pass.

Nothing here knows about strategies or kernels' insides; nothing syncs with the device.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

# Rows per chunk of the O(b * D) helpers below: their temporaries are (ROW_CHUNK, D) compute-dtype
# tensors (64 MiB at D = 512), never (b, D) ones.
ROW_CHUNK = 1 << 15

Mult = Union[float, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(t: Tensor) -> Any:
    """The losses run in their own precision whatever autocast region they are called from."""
    return torch.autocast(t.device.type, enabled=False)


def scalar_grad(meta: tuple[torch.Size, torch.dtype], total: Tensor) -> Tensor:
    """Shape and cast a summed scalar gradient like the parameter it belongs to."""
    shape, dtype = meta
    return total.to(dtype).reshape(shape)


def rowdot(x: Tensor, gx: Tensor) -> Tensor:
    """sum_i x_i . gx_i in gx's dtype, a chunk of rows at a time: no (b, D) temporary."""
    total = gx.new_zeros(())
    for i in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(i, i + ROW_CHUNK)
        total = total + (x[rows].to(gx.dtype) * gx[rows]).sum()
    return total


class RowFinisher:
    """Finishes the row side from the unscaled row gradient gx: dx = mult * gx in x's dtype (if
    wanted) and dot = sum_i x_i . gx_i in the compute dtype (the scale's gradient is a multiple of it).

    It is a RowSink (kernels/base.py): handed to a kernel call it takes gx in finished row chunks, so
    no (b, D) compute-dtype gx ever exists, only dx. A caller that accumulates gx over several blocks
    calls `whole(gx)` instead. `mult` may be a 0-dim tensor (no host read of it)."""

    def __init__(self, x: Tensor, mult: Mult, want_dx: bool):
        self.x, self.mult, self.want_dx = x, mult, want_dx
        self.dot = x.new_zeros((), dtype=compute_dtype(x.dtype))
        self._dx: Optional[Tensor] = None

    def __call__(self, r0: int, gx: Tensor) -> None:
        rows = slice(r0, r0 + gx.shape[0])
        self.dot = self.dot + rowdot(self.x[rows], gx)
        if self.want_dx:
            if self._dx is None:
                self._dx = torch.zeros(self.x.shape, dtype=self.x.dtype, device=self.x.device)
            self._dx[rows] = gx.mul_(self.mult)

    def whole(self, gx: Tensor) -> None:
        """All rows at once; gx is consumed (scaled in place: no second (b, D) buffer for fp32 inputs)."""
        self.dot = rowdot(self.x, gx)
        if self.want_dx:
            self._dx = gx.mul_(self.mult).to(self.x.dtype)

    @property
    def dx(self) -> Optional[Tensor]:
        if self.want_dx and self._dx is None:  # no row was handed over (no rows, or no columns)
            self._dx = torch.zeros(self.x.shape, dtype=self.x.dtype, device=self.x.device)
        return self._dx


def stash_grads(ctx: Any, dx: Optional[Tensor], dy: Optional[Tensor], scalars: list[tuple[Tensor, Tensor]]) -> None:
    """Save gradients computed in the forward pass (SigLIP's: a tile's gradient needs nothing
    global) for `replay_grads`. scalars: (summed gradient, the parameter it belongs to) for each
    scalar input after the two feature tensors."""
    ctx.save_for_backward(dx, dy, *(g for g, _ in scalars))
    ctx.meta = [(p.shape, p.dtype) for _, p in scalars]


def replay_grads(ctx: Any, grad: Tensor, needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """The input gradients saved by `stash_grads`, times the upstream `grad`, for every input that
    needs one (`needs`: features first, then the scalars in order)."""
    dx, dy, *sums = ctx.saved_tensors
    g = grad.to(sums[0].dtype) if sums else grad
    out: list[Optional[Tensor]] = [
        dx * g.to(dx.dtype) if needs[0] and dx is not None else None,
        dy * g.to(dy.dtype) if needs[1] and dy is not None else None,
    ]
    for k, (total, meta) in enumerate(zip(sums, ctx.meta)):
        out.append(scalar_grad(meta, g * total) if needs[2 + k] else None)
    return tuple(out)
