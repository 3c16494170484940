"""The loss families: CLIP's and SigLIP's math, once each (one autograd.Function per family), over
any strategy (megabatch.strategies) and any block-kernel backend (megabatch.kernels); `ops` wraps
both as torch.library custom ops for torch.compile."""
from . import ops
from .clip import DIRECTIONS, clip
from .siglip import siglip

__all__ = ["DIRECTIONS", "clip", "ops", "siglip"]
