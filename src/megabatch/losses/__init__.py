"""The loss families: CLIP's and SigLIP's math, once each (one autograd.Function per family), over
any strategy (megabatch.strategies) and any block-kernel backend (megabatch.kernels)."""
from .clip import DIRECTIONS, clip
from .siglip import siglip

__all__ = ["DIRECTIONS", "clip", "siglip"]
