"""Plain, dense, float64 reference losses: the definitions of docs/design.md written the obvious way.

They materialise the B x N matrix and use autograd; they exist to check every backend and strategy
(tests compare loss and every gradient with them). Inputs of any dtype are upcast to float64. For a
distributed batch, pass the whole global batch (every rank's rows, in rank order) and global ids.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = Union[float, Tensor]


def _f64(t: Scalar, like: Tensor) -> Tensor:
    if isinstance(t, Tensor):
        return t.double().reshape(())
    return torch.tensor(float(t), dtype=torch.float64, device=like.device)


def positive_mask(b: int, n: int, image_ids: Optional[Tensor], text_ids: Optional[Tensor], device: torch.device) -> Tensor:
    """(b, n) bool: image_ids[i] == text_ids[j], or (no ids) i == j."""
    if image_ids is None or text_ids is None:
        return torch.eye(b, n, dtype=torch.bool, device=device)
    return image_ids[:, None] == text_ids[None, :]


def _soft_ce(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over the rows with a positive of the cross-entropy against a target uniform on them
    (NaN when no row has one)."""
    has = mask.any(1)
    target = mask[has].double() / mask[has].sum(1, keepdim=True)
    return -(target * F.log_softmax(logits[has], dim=1)).sum(1).mean()


def clip_loss_reference(
    image_features: Tensor, text_features: Tensor, logit_scale: Scalar, *,
    image_ids: Optional[Tensor] = None, text_ids: Optional[Tensor] = None, directions: str = "both",
) -> Tensor:
    """CLIP: rows (image -> text) and columns (text -> image) each a cross-entropy against a target
    uniform on the positives, averaged over the rows (columns) that have one; "both" halves each."""
    x, y = image_features.double(), text_features.double()
    logits = _f64(logit_scale, x) * x @ y.T
    mask = positive_mask(x.shape[0], y.shape[0], image_ids, text_ids, x.device)
    if directions == "image_to_text":
        return _soft_ce(logits, mask)
    if directions == "text_to_image":
        return _soft_ce(logits.T, mask.T)
    return (_soft_ce(logits, mask) + _soft_ce(logits.T, mask.T)) / 2


def siglip_loss_reference(
    image_features: Tensor, text_features: Tensor, logit_scale: Scalar, logit_bias: Scalar, *,
    image_ids: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
) -> Tensor:
    """-(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = +1 on positives, -1 elsewhere, B images."""
    x, y = image_features.double(), text_features.double()
    logits = _f64(logit_scale, x) * x @ y.T + _f64(logit_bias, x)
    z = 2 * positive_mask(x.shape[0], y.shape[0], image_ids, text_ids, x.device).double() - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]
