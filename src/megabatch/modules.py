"""Thin nn.Module wrappers with open_clip-compatible forward signatures.

    loss_fn = megabatch.ClipLoss()                 # instead of open_clip.ClipLoss(...)
    loss = loss_fn(image_features, text_features, logit_scale)

Like open_clip, `output_dict=True` returns {"contrastive_loss": loss}. They hold settings only;
forward also takes the functional API's `image_ids=` / `text_ids=` keywords (and ClipLoss
`directions=`, defaulting to the module's own).
"""
from __future__ import annotations

from typing import Optional, Union

import torch.distributed as dist
from torch import Tensor, nn

from . import strategies
from ._checks import check_directions
from .functional import Scalar, clip_loss, siglip_loss
from .kernels import BACKENDS


class _ContrastiveLoss(nn.Module):
    def __init__(
        self,
        *,
        strategy: str = "auto",
        backend: str = "auto",
        group: Optional["dist.ProcessGroup"] = None,
        output_dict: bool = False,
        ranks_per_node: Optional[int] = None,
    ):
        super().__init__()
        if strategy not in strategies.STRATEGIES:
            raise ValueError(f"strategy must be one of {strategies.STRATEGIES}, got {strategy!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(output_dict, bool):
            raise TypeError(f"output_dict must be a bool, got {type(output_dict).__name__}")
        if ranks_per_node is not None:  # an int >= 1, and only with strategy='hierarchical'
            strategies.ranks_per_node(strategy, ranks_per_node, group)
        self.strategy, self.backend, self.group, self.output_dict = strategy, backend, group, output_dict
        self.ranks_per_node = ranks_per_node

    def _out(self, loss: Tensor, output_dict: Optional[bool]) -> Union[Tensor, dict[str, Tensor]]:
        as_dict = self.output_dict if output_dict is None else output_dict
        return {"contrastive_loss": loss} if as_dict else loss

    def extra_repr(self) -> str:
        extra = f", directions={self.directions!r}" if hasattr(self, "directions") else ""
        return f"strategy={self.strategy!r}, backend={self.backend!r}{extra}"


class ClipLoss(_ContrastiveLoss):
    """CLIP softmax loss; forward(image_features (b, D), text_features (n, D), logit_scale, *,
    image_ids=None, text_ids=None, directions=None (the module's))."""

    def __init__(self, *, directions: str = "both", **kwargs: object):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        check_directions(directions)
        self.directions = directions

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar, output_dict: Optional[bool] = None,
        *, image_ids: Optional[Tensor] = None, text_ids: Optional[Tensor] = None, directions: Optional[str] = None,
    ) -> Union[Tensor, dict[str, Tensor]]:
        if output_dict is not None and not isinstance(output_dict, bool):
            raise TypeError(
                f"ClipLoss takes no logit_bias; the 4th positional argument is open_clip's output_dict (a bool), "
                f"got {type(output_dict).__name__}: for a sigmoid loss with a bias use megabatch.SigLipLoss"
            )
        loss = clip_loss(
            image_features, text_features, logit_scale, image_ids=image_ids, text_ids=text_ids,
            directions=self.directions if directions is None else directions,
            strategy=self.strategy, backend=self.backend, group=self.group, ranks_per_node=self.ranks_per_node,
        )
        return self._out(loss, output_dict)


class SigLipLoss(_ContrastiveLoss):
    """SigLIP sigmoid loss; forward(image_features (b, D), text_features (n, D), logit_scale, logit_bias,
    *, image_ids=None, text_ids=None)."""

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar,
        output_dict: Optional[bool] = None,
        *,
        image_ids: Optional[Tensor] = None,
        text_ids: Optional[Tensor] = None,
    ) -> Union[Tensor, dict[str, Tensor]]:
        if output_dict is not None and not isinstance(output_dict, bool):
            raise TypeError(f"the 5th positional argument of SigLipLoss is open_clip's output_dict (a bool), got "
                            f"{type(output_dict).__name__}")
        loss = siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            image_ids=image_ids,
            text_ids=text_ids,
            strategy=self.strategy,
            backend=self.backend,
            group=self.group,
            ranks_per_node=self.ranks_per_node,
        )
        return self._out(loss, output_dict)
