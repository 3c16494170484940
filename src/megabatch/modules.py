"""Thin nn.Module wrappers with open_clip-compatible forward signatures.

    loss_fn = megabatch.ClipLoss()                 # instead of open_clip.ClipLoss(...)
    loss = loss_fn(image_features, text_features, logit_scale)

Like open_clip, `output_dict=True` returns {"contrastive_loss": loss}. They hold settings only;
forward also takes the functional API's `image_ids=` / `text_ids=` keywords (and ClipLoss
`directions=`, defaulting to the module's own). Settings are checked when the module is built
(megabatch.spec.check_settings: what needs no process group yet) and each call builds its spec
through the functional API. `backend` may be a name or a configured instance, as for clip_loss;
`memory_budget` is auto's per-rank byte budget (None: the device's free memory).
"""
from __future__ import annotations

from typing import Optional, Union

import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_directions
from .functional import Scalar, clip_loss, siglip_loss
from .spec import Backend, check_settings


class _ContrastiveLoss(nn.Module):
    def __init__(
        self,
        *,
        strategy: str = "auto",
        backend: Backend = "auto",
        group: Optional["dist.ProcessGroup"] = None,
        output_dict: bool = False,
        ranks_per_node: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ):
        super().__init__()
        check_settings(strategy=strategy, backend=backend, group=group, ranks_per_node=ranks_per_node)
        if not isinstance(output_dict, bool):
            raise TypeError(f"output_dict must be a bool, got {type(output_dict).__name__}")
        self.strategy, self.backend, self.group, self.output_dict = strategy, backend, group, output_dict
        self.ranks_per_node, self.memory_budget = ranks_per_node, memory_budget

    def _settings(self) -> dict[str, object]:
        """The functional API's keywords these settings are (it builds each call's spec)."""
        return dict(strategy=self.strategy, backend=self.backend, group=self.group,
                    ranks_per_node=self.ranks_per_node, memory_budget=self.memory_budget)

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
            **self._settings(),  # type: ignore[arg-type]
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
            **self._settings(),  # type: ignore[arg-type]
        )
        return self._out(loss, output_dict)
