"""Adapters that run other implementations under megabatch's benchmark signature.

Each adapter is `(image_features, text_features, logit_scale, logit_bias) -> loss`, with
logit_scale the multiplier (megabatch's convention) and the loss normalised as in DESIGN.md, so
timings compare like with like. "plain" is always available: the open_clip computation (the
dense B x B matrix in the inputs' dtype, F.cross_entropy / F.logsigmoid, autograd). The others are
used only when their package is installed (they are optional benchmark dependencies, never
dependencies of the library); `available()` lists what can run here.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# peer -> losses it implements
PEERS: dict[str, tuple[str, ...]] = {
    "plain": ("clip", "siglip"),
    "open_clip": ("clip", "siglip"),
    "inf_cl": ("clip",),
    "siglip_kernel": ("siglip",),
}
_MODULES = {"open_clip": "open_clip", "inf_cl": "inf_cl", "siglip_kernel": "siglip_kernel"}


def available() -> list[str]:
    return [p for p in PEERS if p not in _MODULES or importlib.util.find_spec(_MODULES[p]) is not None]


def _plain_clip(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
    logits = s.to(x.dtype) * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _plain_siglip(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
    logits = s.to(x.dtype) * x @ y.T + b.to(x.dtype)
    z = 2 * torch.eye(x.shape[0], device=x.device, dtype=x.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _open_clip(loss: str) -> LossFn:
    from open_clip.loss import ClipLoss, SigLipLoss

    if loss == "clip":
        clip = ClipLoss()
        return lambda x, y, s, b: clip(x, y, s)
    siglip = SigLipLoss()
    return lambda x, y, s, b: siglip(x, y, s, b)


def _inf_cl(loss: str) -> LossFn:
    from inf_cl import cal_inf_loss

    # Inf-CL computes one direction (rows); the symmetric CLIP loss averages both.
    return lambda x, y, s, b: (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)) / 2


def _siglip_kernel(loss: str) -> LossFn:
    from siglip_kernel import fused_siglip_loss

    # siglip-kernel takes the log of the scale (a temperature parameter in log space).
    return lambda x, y, s, b: fused_siglip_loss(x, y, torch.log(s), b)


def get(peer: str, loss: str) -> LossFn:
    if peer not in PEERS or loss not in PEERS[peer]:
        raise ValueError(f"peer {peer!r} does not implement the {loss} loss (known: {PEERS})")
    if peer == "plain":
        return _plain_clip if loss == "clip" else _plain_siglip
    return {"open_clip": _open_clip, "inf_cl": _inf_cl, "siglip_kernel": _siglip_kernel}[peer](loss)
