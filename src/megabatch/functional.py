"""The functional API: `clip_loss` and `siglip_loss`.

Both validate their arguments (shapes, dtypes, devices only: no device sync), resolve the backend
(block kernels) and the strategy (how blocks meet across ranks), and hand them to the loss family
(megabatch.losses). They return a 0-dim loss in the compute dtype (float32 for float16/bfloat16/
float32 inputs, float64 for float64 inputs).

Under torch.compile the checks are traced; the loss itself is traced too on one process with the
torch/dense kernels, and otherwise (Triton, gather, ring) runs as a torch.library custom op
(megabatch.losses.ops): no graph break either way.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses, strategies
from ._checks import as_scalar, check_directions, check_features, check_ids, optional_ids
from .kernels import BlockKernels, DenseKernels, TorchChunkedKernels, get_backend

Scalar = Union[float, Tensor]


def _opaque(strategy: str, kernels: BlockKernels) -> bool:
    """While dynamo traces: whether the loss must run as a custom op (megabatch.losses.ops) rather
    than be traced -- distributed strategies (host reads, collectives) and kernels other than the
    torch/dense ones (Triton). Eager calls always take the direct path."""
    if not torch.compiler.is_compiling():
        return False
    return strategy != "local" or not isinstance(kernels, (TorchChunkedKernels, DenseKernels))


def _key(backend: Union[str, BlockKernels], kernels: BlockKernels) -> str:
    """How the custom op names the backend: by name, or a key for an instance the caller passed."""
    return kernels.name if isinstance(backend, str) else losses.ops.backend_key(backend)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    *,
    image_ids: Optional[Tensor] = None,
    text_ids: Optional[Tensor] = None,
    directions: str = "both",
    strategy: str = "auto",
    backend: str = "auto",
    group: Optional["dist.ProcessGroup"] = None,
) -> Tensor:
    """CLIP's softmax (InfoNCE) loss over the global batch, without materialising the similarity matrix.

    S = s * x @ y.T over the global batch. Row i, if it has a positive, contributes
    lse_j S_ij - mean_{j in P(i)} S_ij (cross-entropy against a target uniform on its positives);
    column j likewise. Each direction is averaged over the rows (columns) of the global batch that
    have a positive; "both" takes (rows + columns) / 2. With one positive per row and column (the
    default) this is CLIP's symmetric loss.

    Args:
        image_features: (b, D) float16/bfloat16/float32/float64. Used as given (normalise them
            yourself, as with open_clip).
        text_features: (n, D), same dtype and device; n may differ from b (hard negatives).
        logit_scale: s, the multiplier itself (open_clip's ``logit_scale.exp()``): a 0-dim tensor
            (gradients flow to it) or a float.
        image_ids, text_ids: (b,) and (n,) int64 on the features' device, comparable across ranks:
            pair (i, j) is positive iff image_ids[i] == text_ids[j] (repeated captions, several
            captions per image). Both or neither. None: image i pairs with text i of the same rank
            (i < min(b, n)); every other text is a negative.
        directions: "both", "image_to_text" (rows only: sentence-transformers'
            MultipleNegativesRankingLoss) or "text_to_image" (columns only).
        strategy: "auto" (ring when torch.distributed is initialised with >1 rank, else local),
            "local", "gather" or "ring". See megabatch.strategies.
        backend: "auto" (triton on CUDA when available, else torch), "torch", "triton" or "dense",
            or a configured backend instance (e.g. ``TritonKernels(TritonConfig(...))``).
        group: process group spanning the contrastive batch (default: the world group).

    Returns:
        0-dim loss. Distributed, rank r returns L_r whose mean over ranks is the global loss, and its
        feature gradients are W * dL/d(its features) (open_clip's local_loss=True,
        gather_with_grad=True), so DDP's gradient averaging gives exactly dL/dtheta. A rank may hold
        no images or no texts while the global batch has both.
        NaN or inf in the inputs propagate to a NaN loss, and a global batch without any positive
        pair gives NaN: neither is checked (that would sync with the device).
    """
    name = strategies.resolve(strategy, group)
    with strategies.validating(name, image_features, group):
        check_features(image_features, text_features, allow_empty=name != "local")
        ids = check_ids(image_ids, text_ids, image_features, text_features)
        check_directions(directions)
        scale = as_scalar("logit_scale", logit_scale, image_features)
        kernels = get_backend(backend, image_features.device)
    direction = losses.DIRECTIONS[directions]
    if _opaque(name, kernels):
        return losses.ops.clip(image_features, text_features, scale, optional_ids(image_ids), optional_ids(text_ids),
                               direction, name, group, _key(backend, kernels))
    strat = strategies.create(name, image_features, text_features, (scale,), kernels, group, ids=ids,
                              directions=direction)
    return losses.clip(image_features, text_features, scale, strat, kernels, optional_ids(image_ids),
                       optional_ids(text_ids), direction)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    image_ids: Optional[Tensor] = None,
    text_ids: Optional[Tensor] = None,
    strategy: str = "auto",
    backend: str = "auto",
    group: Optional["dist.ProcessGroup"] = None,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch, without materialising the matrix.

    L = -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z_ij = +1 for a positive pair, -1 otherwise,
    B the number of images in the global batch (the SigLIP paper's normalisation).

    Args:
        image_features: (b, D) float16/bfloat16/float32/float64.
        text_features: (n, D), same dtype and device; n may differ from b.
        logit_scale: s, the multiplier itself (``logit_scale.exp()``), 0-dim tensor or float.
        logit_bias: b, 0-dim tensor or float (SigLIP initialises it at -10).
        image_ids, text_ids, strategy, backend, group: as for :func:`clip_loss`.

    Returns:
        0-dim loss, with the same distributed convention as :func:`clip_loss`.
    """
    name = strategies.resolve(strategy, group)
    with strategies.validating(name, image_features, group):
        check_features(image_features, text_features, allow_empty=name != "local")
        ids = check_ids(image_ids, text_ids, image_features, text_features)
        scale = as_scalar("logit_scale", logit_scale, image_features)
        bias = as_scalar("logit_bias", logit_bias, image_features)
        kernels = get_backend(backend, image_features.device)
    if _opaque(name, kernels):
        return losses.ops.siglip(image_features, text_features, scale, bias, optional_ids(image_ids),
                                 optional_ids(text_ids), name, group, _key(backend, kernels))
    strat = strategies.create(name, image_features, text_features, (scale, bias), kernels, group, ids=ids)
    return losses.siglip(image_features, text_features, scale, bias, strat, kernels, optional_ids(image_ids),
                         optional_ids(text_ids))
