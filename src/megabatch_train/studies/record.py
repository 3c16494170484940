"""What every `megabatch study` records beside its numbers: the machine and command it ran on, and the
SigLIP paper's reading its curves are compared with. Its own module so that the emoji study (study.py)
and the WordNet study (wordnet_study.py), which study.py dispatches to, share it without an import circle.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any

import torch

# The SigLIP paper (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Fig. 2),
# ImageNet zero-shot of SigLiT/LiT-style runs against batch size, read off its figure: sigmoid
# ahead below ~16k, both saturating near 32k, sigmoid best at 256k, a million no better.
PAPER = ("Zhai et al. 2023 (arXiv 2303.15343), Fig. 2 and abstract: sigmoid > softmax below ~16k; both saturate ~32k; "
         "SigLiT peaks at 256k; 1M no better")


def environment(argv: list[str]) -> dict[str, Any]:
    return {"command": "megabatch study " + " ".join(argv), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "threads_per_run": 1}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
