"""The functional API: `clip_loss` and `siglip_loss`.

Both validate their arguments (shapes, dtypes, devices only: no device sync), resolve the backend
(block kernels) and the strategy (how blocks meet across ranks), and return a 0-dim loss in the
compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Union

import torch.distributed as dist
from torch import Tensor

from . import strategies
from ._checks import as_scalar, check_features
from .kernels import get_backend

Scalar = Union[float, Tensor]


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    *,
    strategy: str = "auto",
    backend: str = "auto",
    group: Optional["dist.ProcessGroup"] = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE loss over the global batch, without materialising the B x B matrix.

    L = 1/(2B) sum_i [lse_j S_ij - S_ii] + 1/(2B) sum_j [lse_i S_ij - S_jj],  S = s * x @ y.T.

    Args:
        image_features: (b, D) float16/bfloat16/float32/float64; row i pairs with text row i.
            Used as given (normalise them yourself, as with open_clip).
        text_features: (b, D), same dtype and device.
        logit_scale: s, the multiplier itself (open_clip's ``logit_scale.exp()``): a 0-dim tensor
            (gradients flow to it) or a float.
        strategy: "auto" (ring when torch.distributed is initialised with >1 rank, else local),
            "local", "gather" or "ring". See megabatch.strategies.
        backend: "auto" (triton on CUDA when available, else torch), "torch", "triton" or "dense".
        group: process group spanning the contrastive batch (default: the world group).

    Returns:
        0-dim loss. Distributed, rank r returns L_r whose mean over ranks is the global loss, and its
        feature gradients are W * dL/d(its features) (open_clip's local_loss=True,
        gather_with_grad=True), so DDP's gradient averaging gives exactly dL/dtheta.
        NaN or inf in the inputs propagate to a NaN loss; they are not checked (that would sync).
    """
    name = strategies.resolve(strategy, group)
    with strategies.validating(name, image_features, group):
        check_features(image_features, text_features, allow_empty=name != "local")
        scale = as_scalar("logit_scale", logit_scale, image_features)
        kernels = get_backend(backend, image_features.device)
    return strategies.get(name).clip(image_features, text_features, scale, kernels, group)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    strategy: str = "auto",
    backend: str = "auto",
    group: Optional["dist.ProcessGroup"] = None,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch, without materialising the matrix.

    L = -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)),  z_ij = +1 if i == j else -1
    (the SigLIP paper's normalisation: summed over pairs, divided by the batch).

    Args:
        image_features: (b, D) float16/bfloat16/float32/float64; row i pairs with text row i.
        text_features: (b, D), same dtype and device.
        logit_scale: s, the multiplier itself (``logit_scale.exp()``), 0-dim tensor or float.
        logit_bias: b, 0-dim tensor or float (SigLIP initialises it at -10).
        strategy, backend, group: as for :func:`clip_loss`.

    Returns:
        0-dim loss, with the same distributed convention as :func:`clip_loss`.
    """
    name = strategies.resolve(strategy, group)
    with strategies.validating(name, image_features, group):
        check_features(image_features, text_features, allow_empty=name != "local")
        scale = as_scalar("logit_scale", logit_scale, image_features)
        bias = as_scalar("logit_bias", logit_bias, image_features)
        kernels = get_backend(backend, image_features.device)
    return strategies.get(name).siglip(image_features, text_features, scale, bias, kernels, group)
