"""The functional API: `clip_loss` and `siglip_loss`.

Both validate their arguments (shapes, dtypes, devices only: no device sync) and resolve the backend
(block kernels) and the strategy (how blocks meet across ranks) into one LossSpec, once
(megabatch.spec.loss_spec), and hand it with the tensors to the loss family (megabatch.losses).
They return a 0-dim loss in the compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs).

Two roads, same arguments: eager calls, and under torch.compile one process with the torch/dense
kernels (traced), take losses.clip / losses.siglip; otherwise while dynamo traces (Triton, gather,
ring) losses.ops.clip / losses.ops.siglip, torch.library custom ops: no graph break either way.
"""
from __future__ import annotations

from typing import Optional, Union

import torch.distributed as dist
from torch import Tensor

from . import losses
from ._checks import optional_ids
from .spec import Backend, loss_spec

Scalar = Union[float, Tensor]


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    *,
    image_ids: Optional[Tensor] = None,
    text_ids: Optional[Tensor] = None,
    directions: str = "both",
    strategy: str = "auto",
    backend: Backend = "auto",
    group: Optional["dist.ProcessGroup"] = None,
    ranks_per_node: Optional[int] = None,
    memory_budget: Optional[int] = None,
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
            (gradients flow to it) or a real number of any kind (float, int, numpy.float32, ...).
        image_ids, text_ids: (b,) and (n,) int64 on the features' device, comparable across ranks:
            pair (i, j) is positive iff image_ids[i] == text_ids[j] (repeated captions, several
            captions per image). Both or neither. None: image i pairs with text i of the same rank
            (i < min(b, n)); every other text is a negative.
        directions: "both", "image_to_text" (rows only: sentence-transformers'
            MultipleNegativesRankingLoss) or "text_to_image" (columns only).
        strategy: "auto" (ring when torch.distributed is initialised with >1 rank, else local),
            "local", "gather", "ring" or "hierarchical" (a ring between nodes, an all-gather within
            each). See megabatch.strategies.
        backend: "auto" (triton on CUDA when available, else torch), "torch", "triton" or "dense",
            or a configured backend instance (e.g. ``TritonKernels(TritonConfig(...))``).
        group: process group spanning the contrastive batch (default: the world group).
        ranks_per_node: "hierarchical" only: ranks per node R (group rank i is on node i // R; R
            must divide the group's size and be the same on every rank). None: torchrun's
            LOCAL_WORLD_SIZE.
        memory_budget: auto's per-rank byte budget (None: the device's free memory); a positive int.

    Returns:
        0-dim loss. Distributed, rank r returns L_r whose mean over ranks is the global loss, and its
        feature gradients are W * dL/d(its features) (open_clip's local_loss=True,
        gather_with_grad=True), so DDP's gradient averaging gives exactly dL/dtheta. A rank may hold
        no images or no texts while the global batch has both.
        NaN or inf in the inputs propagate to a NaN loss, and a global batch without any positive
        pair gives NaN: neither is checked (that would sync with the device).
    """
    spec, (scale,) = loss_spec("clip", image_features, text_features, [("logit_scale", logit_scale)],
                               image_ids=image_ids, text_ids=text_ids, directions=directions, strategy=strategy,
                               backend=backend, group=group, ranks_per_node=ranks_per_node,
                               memory_budget=memory_budget)
    road = losses.ops.clip if spec.opaque else losses.clip
    return road(spec, image_features, text_features, scale, optional_ids(image_ids), optional_ids(text_ids))


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    image_ids: Optional[Tensor] = None,
    text_ids: Optional[Tensor] = None,
    strategy: str = "auto",
    backend: Backend = "auto",
    group: Optional["dist.ProcessGroup"] = None,
    ranks_per_node: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch, without materialising the matrix.

    L = -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z_ij = +1 for a positive pair, -1 otherwise,
    B the number of images in the global batch (the SigLIP paper's normalisation).

    Args:
        image_features: (b, D) float16/bfloat16/float32/float64.
        text_features: (n, D), same dtype and device; n may differ from b.
        logit_scale: s, the multiplier itself (``logit_scale.exp()``), 0-dim tensor or real number.
        logit_bias: b, 0-dim tensor or real number (SigLIP initialises it at -10).
        image_ids, text_ids, strategy, backend, group, ranks_per_node, memory_budget: as for
            :func:`clip_loss`.

    Returns:
        0-dim loss, with the same distributed convention as :func:`clip_loss`.
    """
    spec, (scale, bias) = loss_spec("siglip", image_features, text_features,
                                    [("logit_scale", logit_scale), ("logit_bias", logit_bias)], image_ids=image_ids,
                                    text_ids=text_ids, strategy=strategy, backend=backend, group=group,
                                    ranks_per_node=ranks_per_node, memory_budget=memory_budget)
    road = losses.ops.siglip if spec.opaque else losses.siglip
    return road(spec, image_features, text_features, scale, bias, optional_ids(image_ids), optional_ids(text_ids))
