"""FSDP2 helpers that need no framework besides torch: below GradCache and the integrations, which both
use them (megabatch.integrations.fsdp re-exports them, the name the HF loss and the app import)."""
from __future__ import annotations

from typing import Any

from torch import nn


def is_fsdp(module: Any) -> bool:
    """Whether `module` was `fully_shard`-ed (FSDP2; torch >= 2.6 exports FSDPModule publicly)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: FSDP2 lives in a private module, or not at all
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(module, FSDPModule)


def is_dtensor(value: Any) -> bool:
    """Whether `value` is a DTensor (e.g. a sharded FSDP2 parameter, or computed from one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def shardable(model: nn.Module) -> nn.Module:
    """Make every 0-dim parameter (CLIPModel's or open_clip's logit_scale) a 1-element one, in
    place, so that FSDP2's ``fully_shard`` accepts the model ("fully_shard doesn't support scalar
    parameters"); the models' forward and megabatch's losses broadcast it alike. Returns the model."""
    for module in list(model.modules()):  # a wrapper's modules() include its inner module's
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    return model
