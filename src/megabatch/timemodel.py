"""`megabatch plan --time`'s flags and the description of its rates; the model itself is cost/time.py's
(docs/performance.md, "Which strategy at 256 GPUs"), re-exported here.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from typing import Any, Optional

from .cost.time import CPU, GPUS, RATIO, SUPER, Hardware, step_time

__all__ = ["CPU", "DEFAULT_GPU", "GPUS", "Hardware", "MEASURED", "RATIO", "SUPER", "add_arguments", "describe",
           "hardware", "step_time", "without_time"]


def hardware(a: argparse.Namespace, device: str = "cuda") -> Hardware:
    """The --gpu preset (default H200; --device cpu without --gpu: cost.time.CPU) with the flags given over it."""
    hw = CPU if device == "cpu" and not a.gpu else GPUS[a.gpu or DEFAULT_GPU]
    over = {"gemm_flops": a.gemm_tflops and a.gemm_tflops * 1e12, "intra_bw": a.intra_bw and a.intra_bw * 1e9,
            "inter_bw": a.inter_bw and a.inter_bw * 1e9, "latency": a.latency and a.latency * 1e-6,
            "ranks_per_node": a.ranks_per_node}
    return replace(hw, **{k: v for k, v in over.items() if v is not None})


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return v
    return parse


DEFAULT_GPU = "H200"
# The flags that only the time model reads (--ranks-per-node also places hierarchical's nodes without --time)
TIME_FLAGS = ("gpu", "gemm_tflops", "intra_bw", "inter_bw", "latency")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("time model (--time; figures per GPU, the preset's unless given; each of these "
                             "flags but --ranks-per-node needs --time)")
    g.add_argument("--time", action="store_true", help="predict each option's loss step time; auto picks the fastest")
    g.add_argument("--gpu", type=str.upper, choices=tuple(GPUS), help=f"hardware preset, any case (default "
                   f"{DEFAULT_GPU})")
    g.add_argument("--gemm-tflops", type=_positive(float), help="achieved dense GEMM TFLOP/s (H200: 790)")
    g.add_argument("--intra-bw", type=_positive(float), help="GB/s per direction within a node (H200: 450)")
    g.add_argument("--inter-bw", type=_positive(float), help="GB/s per GPU across nodes (H200: 50, one NDR NIC)")
    g.add_argument("--latency", type=_positive(float), help="microseconds per hop (default 10)")
    g.add_argument("--ranks-per-node", type=_positive(int), help="GPUs per node (default 8); also how "
                   "--strategy hierarchical groups ranks, with or without --time")


def without_time(a: argparse.Namespace) -> Optional[str]:
    """The first time-model flag given without --time, as written (e.g. "--gemm-tflops"); None if none."""
    if a.time:
        return None
    return next(("--" + name.replace("_", "-") for name in TIME_FLAGS if getattr(a, name) is not None), None)


# What was held against a measurement, where (benchmarks/time_model_check.py; docs/performance.md)
MEASURED = {"bytes": "exact: _comm's counters, gloo, W = 1..8 (plan_check.py); hierarchical W = 4, 6 "
                     "(time_model_check.py)",
            "messages": "exact: _comm's counters, gloo, W = 2; hierarchical W = 4, 6 (time_model_check.py)",
            "compute": "CPU only: torch backend 0.7-1.2x its GEMM floor there, RATIO says 2.5 (2-3.5x high)",
            "transfer+latency+overlap": "CPU, gloo, W = 2, measured ratio: within 12% at B = 4096; overlap untested",
            "gpu": "nothing: every GPU rate and ratio is assumed"}


def describe(hw: Hardware) -> dict[str, Any]:
    return {**asdict(hw), "status": "predicted (assumed rates)", "measured": MEASURED}
