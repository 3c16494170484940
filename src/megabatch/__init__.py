"""megabatch: exact CLIP and SigLIP losses for enormous contrastive batches.

    import megabatch as mb
    loss = mb.clip_loss(image_features, text_features, logit_scale)
    loss = mb.siglip_loss(image_features, text_features, logit_scale, logit_bias)
"""
from .functional import clip_loss, siglip_loss
from .gradcache import GradCache
from .modules import ClipLoss, SigLipLoss
from .reference import clip_loss_reference, siglip_loss_reference

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "GradCache",
    "SigLipLoss",
    "clip_loss",
    "clip_loss_reference",
    "siglip_loss",
    "siglip_loss_reference",
]
