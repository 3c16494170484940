"""Benchmark tooling beside the library: `megabatch bench` (single.py, distributed.py), the harness that
times and measures for it and for benchmarks/gpu_check.py (harness.py), and the peer adapters it
compares against (peers.py). The losses never import this package.

    megabatch bench --loss clip siglip --backend torch dense --batch 4096 8192 --dim 64
    torchrun --nproc_per_node 4 -m megabatch.bench --strategy ring gather --batch 2048
"""
from .harness import PeakMemory, environment, make_inputs
from .single import Case, Result, main, measure, measure_isolated, skip_reason

__all__ = ["Case", "PeakMemory", "Result", "environment", "main", "make_inputs", "measure", "measure_isolated",
           "skip_reason"]
