"""Plain, dense, float64 reference losses: the formulas of DESIGN.md written the obvious way.

They materialise the B x B matrix and use autograd; they exist to check every backend and strategy
(tests compare loss and every gradient with them). Inputs of any dtype are upcast to float64.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = Union[float, Tensor]


def _f64(t: Scalar, like: Tensor) -> Tensor:
    if isinstance(t, Tensor):
        return t.double().reshape(())
    return torch.tensor(float(t), dtype=torch.float64, device=like.device)


def clip_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale: Scalar) -> Tensor:
    """Symmetric InfoNCE: mean over rows and columns of cross-entropy against the diagonal."""
    x, y = image_features.double(), text_features.double()
    logits = _f64(logit_scale, x) * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss_reference(
    image_features: Tensor, text_features: Tensor, logit_scale: Scalar, logit_bias: Scalar
) -> Tensor:
    """-(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = +1 on the diagonal, -1 elsewhere."""
    x, y = image_features.double(), text_features.double()
    logits = _f64(logit_scale, x) * x @ y.T + _f64(logit_bias, x)
    z = 2 * torch.eye(x.shape[0], dtype=torch.float64, device=x.device) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]
