"""FSDP2 helpers that need no framework besides torch."""
from __future__ import annotations

from torch import nn


def shardable(model: nn.Module) -> nn.Module:
    """Make every 0-dim parameter (CLIPModel's or open_clip's logit_scale) a 1-element one, in
    place, so that FSDP2's ``fully_shard`` accepts the model ("fully_shard doesn't support scalar
    parameters"); the models' forward and megabatch's losses broadcast it alike. Returns the model."""
    for module in list(model.modules()):  # a wrapper's modules() include its inner module's
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    return model
