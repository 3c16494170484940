"""The tolerance rule shared by every backend/strategy test.

An implementation's loss and gradients are compared with the float64 reference on the same inputs
(relative norm error). The bound is 2x the error that plain PyTorch makes computing the same loss
in the inputs' own precision (the open_clip way: logits in that dtype; `F.cross_entropy` with
probability targets uniform on the positives for CLIP, `F.logsigmoid` with +-1 labels for SigLIP),
plus a small floor per dtype. No allowance for the CLIP loss value: its positive logits come from
the same tiles as its normalisers, so it is as exact as plain cross-entropy even near zero.
The logit_scale/logit_bias gradients are sums sum_ij G_ij x_i.y_j (resp. sum_ij G_ij) that can cancel
to far below their terms; their error is measured against the size of the terms (sum |G_ij x_i.y_j|),
the condition of the sum, so a loss near its optimum does not demand more than fp32 can hold.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import megabatch as mb

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: Tensor, ref: Tensor, denom: Optional[float] = None) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    scale = float(ref.norm()) if denom is None else denom
    return float((out - ref).norm()) / max(scale, 1e-30)


def _mask(x: Tensor, y: Tensor, ids: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    return mb.reference.positive_mask(x.shape[0], y.shape[0], *(ids or (None, None)), x.device)


def _soft_ce(logits: Tensor, mask: Tensor) -> Tensor:
    has = mask.any(1)
    target = mask[has].to(logits.dtype) / mask[has].sum(1, keepdim=True).to(logits.dtype)
    return F.cross_entropy(logits[has], target)


def plain_clip(x: Tensor, y: Tensor, s: Tensor, ids: Optional[tuple[Tensor, Tensor]] = None,
               directions: str = "both") -> Tensor:
    """The open_clip way, in the inputs' dtype: dense logits, cross-entropy per direction."""
    logits = s.to(x.dtype) * x @ y.T
    mask = _mask(x, y, ids)
    return _clip_of_logits(logits, mask, directions)


def plain_siglip(x: Tensor, y: Tensor, s: Tensor, b: Tensor, ids: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    logits = s.to(x.dtype) * x @ y.T + b.to(x.dtype)
    z = 2 * _mask(x, y, ids).to(x.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _scalar_conditions(kind: str, leaves: Sequence[Tensor], ids: Optional[tuple[Tensor, Tensor]],
                       directions: str) -> tuple[float, float]:
    """(sum |G_ij M_ij|, sum |G_ij|) in float64, M = x @ y.T, G = dL/dS: the terms of dL/ds, dL/db."""
    x, y = leaves[0].double(), leaves[1].double()
    m = x @ y.T
    logits = (leaves[2].double() * m).requires_grad_(True)
    mask = _mask(x, y, ids)
    if kind == "clip":
        loss = _clip_of_logits(logits, mask, directions)
    else:
        loss = -F.logsigmoid((2 * mask.double() - 1) * (logits + leaves[3].double())).sum() / x.shape[0]
    (g,) = torch.autograd.grad(loss, logits)
    return float((g * m).abs().sum()), float(g.abs().sum())


def _clip_of_logits(logits: Tensor, mask: Tensor, directions: str) -> Tensor:
    if directions == "image_to_text":
        return _soft_ce(logits, mask)
    if directions == "text_to_image":
        return _soft_ce(logits.T, mask.T)
    return (_soft_ce(logits, mask) + _soft_ce(logits.T, mask.T)) / 2


def _loss_and_grads(fn: Callable[..., Tensor], leaves: Sequence[Tensor]) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def check_against_reference(
    kind: str,
    fn: Callable[..., Tensor],
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ids: Optional[tuple[Tensor, Tensor]] = None,
    directions: str = "both",
    extra_floor: float = 1.0,
) -> list[float]:
    """Assert fn's loss and every gradient are within the tolerance rule. Returns the errors.

    fn(x, y, scale[, bias]) computes the loss under test; `ids` / `directions` describe which pairs
    are positive (they are what fn must have been given too)."""
    leaves = [x, y, scale] + ([bias] if kind == "siglip" else [])
    kw = {} if ids is None else {"image_ids": ids[0], "text_ids": ids[1]}
    if kind == "clip":
        def ref_fn(*a: Tensor) -> Tensor:
            return mb.clip_loss_reference(*a, directions=directions, **kw)

        def plain_fn(*a: Tensor) -> Tensor:
            return plain_clip(*a, ids, directions)
    else:
        def ref_fn(*a: Tensor) -> Tensor:
            return mb.siglip_loss_reference(*a, **kw)

        def plain_fn(*a: Tensor) -> Tensor:
            return plain_siglip(*a, ids)
    ref = _loss_and_grads(ref_fn, [t.double() for t in leaves])
    ours = _loss_and_grads(fn, leaves)
    try:
        plain = _loss_and_grads(plain_fn, leaves)
    except RuntimeError:  # e.g. an op without a half kernel on this device
        plain = None
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    conditions = _scalar_conditions(kind, leaves, ids, directions)
    errors = []
    for k, (o, r) in enumerate(zip(ours, ref)):
        if k == 0:
            assert o.shape == () and o.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        if k in (1, 2):
            assert o.dtype == x.dtype, f"{names[k]} came back as {o.dtype}, inputs are {x.dtype}"
        if k >= 3:
            assert o.shape == leaves[k - 1].shape and o.dtype == leaves[k - 1].dtype
        denom = max(float(r.abs()), conditions[k - 3]) if k >= 3 else None
        err = rel_err(o, r, denom)
        plain_err = rel_err(plain[k], r, denom) if plain is not None else math.inf
        bound = FLOOR[x.dtype] * extra_floor + (2 * plain_err if math.isfinite(plain_err) else 0.0)
        assert err <= bound, f"{kind} {names[k]}: error {err:.3e} > bound {bound:.3e} (plain PyTorch {plain_err:.3e})"
        errors.append(err)
    return errors
