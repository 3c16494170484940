"""The cost model: per-rank peak memory, bytes sent and step time of one loss call per strategy, and
`choose`, what strategy="auto" picks from them. Pure arithmetic on sizes (no torch.distributed, no tensors):
it sits below the strategies, which consult it once their layout exchange has shared every rank's sizes,
and `megabatch plan` prints the same answer from the command's.

    terms.py   the shape a rank sees (Shape, shape_of), its memory terms and the bytes it sends
    time.py    the hardware profiles (Hardware, GPUS, CPU) and the time of a step (step_time)
    pick.py    the pick ("auto"): choose(shape, hardware, budget) -> Choice, with its reason and candidates
"""
from __future__ import annotations

from .pick import DEFAULT_GPU, PROFILES, Candidate, Choice, candidates, choose, profile, profile_of
from .terms import DTYPES, LAYOUT_BYTES, LAYOUT_COLUMNS, Shape, memory_terms, sent_bytes, shape_of
from .time import CPU, GPUS, RATIO, Hardware, step_time

__all__ = ["CPU", "Candidate", "Choice", "DEFAULT_GPU", "DTYPES", "GPUS", "Hardware", "LAYOUT_BYTES", "LAYOUT_COLUMNS",
           "PROFILES", "RATIO", "Shape", "candidates", "choose", "memory_terms", "profile", "profile_of",
           "sent_bytes", "shape_of", "step_time"]
