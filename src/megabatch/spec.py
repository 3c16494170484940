"""A loss call's arguments, validated once, become its `LossSpec` (losses/options.py) here.

Every front comes through this module: `clip_loss` / `siglip_loss` build the spec of each call with
`loss_spec`; the objects that hold settings (ClipLoss / SigLipLoss, integrations.hf's
ContrastiveLoss and Trainer, integrations.sentence_transformers' MegabatchLoss) check them when
built with `check_settings` and call the functional API, which builds the spec of each call. Below
the spec nothing validates again: the loss families, the custom ops and the strategies take it as
it is.

Who checks what, once each:
  a strategy, with ranks_per_node and memory_budget   strategies.make_spec
  a backend (a name, or a configured instance)         kernels.check_backend (get_backend resolves it)
  a micro-batch size (micro_batch_size, ...)           _microbatch.check_size
  features, ids, scalars, directions                   _checks
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.distributed as dist
from torch import Tensor

from . import strategies
from ._checks import as_scalar, check_directions, check_features, check_ids
from .kernels import check_backend, get_backend
from .kernels.base import BlockKernels
from .losses import DIRECTIONS, LossSpec, needs_grad

Backend = Union[str, BlockKernels]

__all__ = ["Backend", "check_settings", "loss_spec"]


def loss_spec(
    family: str,
    image_features: Tensor,
    text_features: Tensor,
    scalars: Sequence[tuple[str, object]],
    *,
    image_ids: Optional[Tensor],
    text_ids: Optional[Tensor],
    directions: str = "both",
    strategy: object = "auto",
    backend: object = "auto",
    group: Optional["dist.ProcessGroup"] = None,
    ranks_per_node: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> tuple[LossSpec, list[Tensor]]:
    """The spec of one call of `family` ("clip" or "siglip") and its scalars as tensors on the
    features' device (`scalars`: (argument name, value) pairs, e.g. ("logit_scale", 10.0)).

    Reads shapes, dtypes and devices only (no device sync). Under a distributed strategy a check
    that fails on one rank is reported to the others first (strategies.validating), so every rank
    raises instead of some waiting in the layout exchange."""
    with strategies.validating(_before_spec(strategy, group), image_features, group):
        st = strategies.make_spec(strategy, group, ranks_per_node=ranks_per_node, memory_budget=memory_budget)
    with strategies.validating(st.name, image_features, group):
        check_features(image_features, text_features, allow_empty=st.name != "local")
        ids = check_ids(image_ids, text_ids, image_features, text_features)
        if family == "clip":
            check_directions(directions)
        tensors = [as_scalar(name, value, image_features) for name, value in scalars]
        kernels = get_backend(backend, image_features.device)  # type: ignore[arg-type]
    named = kernels.name if isinstance(backend, str) else kernels
    direction = DIRECTIONS[directions] if family == "clip" else 0
    spec = LossSpec(family, st, named, kernels, needs_grad(image_features, text_features, *tensors), group,
                    direction, ids)
    return spec, tensors


def _before_spec(strategy: object, group: object) -> str:
    """What `strategies.validating` is told while make_spec itself runs (the strategy not known
    yet): peers can only be waiting in a layout exchange when torch.distributed is initialised,
    `group` is a process group (or None) and the strategy asked for is not "local"."""
    if not (dist.is_available() and dist.is_initialized()):
        return "local"
    if strategy == "local" or not (group is None or isinstance(group, dist.ProcessGroup)):
        return "local"
    return str(strategy)


def check_settings(
    *,
    strategy: object,
    backend: object,
    group: Optional["dist.ProcessGroup"] = None,
    ranks_per_node: Optional[int] = None,
    directions: Optional[str] = None,
) -> None:
    """What an object holding a loss's settings checks when it is built, before torch.distributed
    may be initialised: the strategy's name and an explicit ranks_per_node (strategies: the same
    errors as make_spec raises; the world-dependent rest -- "auto", LOCAL_WORLD_SIZE, a process
    group to join -- and memory_budget are make_spec's at the first call), the backend
    (kernels.check_backend) and CLIP's directions."""
    strategies.planned(strategy, 1)  # type: ignore[arg-type]
    if ranks_per_node is not None:
        strategies.ranks_per_node(strategy, ranks_per_node, group)  # type: ignore[arg-type]
    check_backend(backend)
    if directions is not None:
        check_directions(directions)
