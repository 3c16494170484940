"""The loss families: CLIP's and SigLIP's math, once each (one autograd.Function per family), over
any strategy (megabatch.strategies) and any block-kernel backend (megabatch.kernels). A call's
spec travels as one `LossSpec` (options.py) down either road: `clip` / `siglip` (eager) or
`ops.clip` / `ops.siglip` (the torch.library custom ops torch.compile traces), same arguments."""
from . import ops
from .clip import DIRECTIONS, clip
from .options import LOSSES, Features, LossSpec, needs_grad
from .siglip import siglip

__all__ = ["DIRECTIONS", "LOSSES", "Features", "LossSpec", "clip", "needs_grad", "ops", "siglip"]
