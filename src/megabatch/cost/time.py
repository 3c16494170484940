"""A time model of one loss step per strategy: what strategy="auto" and `megabatch plan --time` price
(docs/performance.md, "Which strategy at 256 GPUs"). Pure arithmetic: no torch.distributed.

Per rank and step, for each strategy, four terms (seconds):
  * compute: the kernels' FLOP (CLIP 4 GEMM-sized passes of 2*b*cols*D, SigLIP 3) at `gemm_tflops` times the
    backend's ratio to that GEMM floor (RATIO), but never below `kernel_floor` per kernel launch (small
    tiles: a visit of a 128-row block is launch-bound, not FLOP-bound);
  * transfer: bytes over each kind of link. A flat ring rank sends to its successor: within a node over
    NVLink (`intra_bw`), and (W > ranks_per_node) once per node across InfiniBand (`inter_bw`, one NIC):
    every step waits for the slowest hop. NCCL's collectives (gather) are bandwidth-optimal and rail-aware:
    a rank's (W-1)/W share moves over NVLink at `intra_bw` and over the node's ranks_per_node NICs at once;
  * latency: hops x `latency`. The ring pays one per step and pass (W per pass, plus the accumulators'
    last hop home), in sequence; a collective pays 2 * ceil(log2 W) (NCCL's tree / PAT schedules);
  * overlap: what the strategy hides. The ring posts its sends before each visit, so a step costs
    max(compute, transfer) + latency at `overlap` = 1 (compute + transfer at 0); gather's collectives
    wait for their data (nothing hidden).
The node-aware ring (hierarchical; `_hierarchical`) is modelled from its design: W / ranks_per_node steps a
pass, each max(InfiniBand p2p, NVLink all-gather + one visit of the node's R slices + node reduction) plus
1 + 4 * ceil(log2 R) hops; its bytes are cost.terms.sent_bytes's (hierarchical_passes, node_reduction).
The hardware figures are assumptions (GPUS: 80% of the dense bf16 spec, NVLink per direction, one NDR/HDR
NIC per GPU, a 10 us hop); override them with the flags. Measured here (benchmarks/time_model_check.py, CPU,
gloo, W = 1, 2; rows in benchmarks/time_model_cpu.json): bytes and messages per step, exact; the compute
term, 2-3.5x high on a CPU (the torch backend runs at 0.7-1.2x its GEMM floor there, not RATIO's 2.5);
with the measured ratio, W = 2 step times within 12% at B = 4096. hierarchical (--hierarchical: W = 4 as
2 x 2, W = 6 as 3 x 2 and 2 x 3; CLIP and SigLIP, with and without ids): bytes and messages per pass, exact
on gloo, after two fixes the check found (CLIP's column lse is two all-reduces, not one reduce-scatter;
gloo all-reduces the node sums, twice NCCL's reduce-scatter, which stays the CUDA figure, uncounted);
its times are not measured (the shapes only count). Everything for a GPU is predicted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .terms import LAYOUT_BYTES, node_reduction, passes

# Each backend's time over the GEMM floor of its passes (benchmarks/triton_notes.md's predictions for triton;
# the torch backend's chunked elementwise passes and dense's b x n round trips through memory: guesses, GPU
# unmeasured). CPU (float32, `megabatch bench`): see docs/performance.md.
RATIO = {("triton", "siglip"): 1.35, ("triton", "clip"): 1.7, ("torch", "siglip"): 2.5, ("torch", "clip"): 2.5,
         ("dense", "siglip"): 1.5, ("dense", "clip"): 1.5}
SUPER = 8192  # the triton super-block (TritonConfig.default): one set of launches per super-block


@dataclass(frozen=True)
class Hardware:
    """Rates per GPU (rank). Bandwidths in bytes/s per direction, latency and kernel_floor in seconds."""

    name: str
    gemm_flops: float
    intra_bw: float
    inter_bw: float
    latency: float = 10e-6
    ranks_per_node: int = 8
    kernel_floor: float = 4e-6  # a small kernel's launch-to-finish on a busy stream (assumed)
    overlap: float = 1.0
    ratio: Optional[float] = None  # the kernels' time over their GEMM floor on this hardware (None: RATIO's)


GPUS = {
    # 80% of 312 dense bf16 TFLOP/s; NVLink 3 300 GB/s per direction; one HDR NIC (200 Gb/s)
    "A100": Hardware("A100", 250e12, 240e9, 25e9),
    # 80% of 989; NVLink 4 450 GB/s per direction; one NDR NIC (400 Gb/s)
    "H100": Hardware("H100", 790e12, 450e9, 50e9),
    "H200": Hardware("H200", 790e12, 450e9, 50e9),  # the H100's compute and links (more, faster memory)
}
# A CPU rank under gloo, from what docs/performance.md measured on this project's 2-core machine (one
# thread a process): a GEMM rate of 14-97 GFLOP/s (50 taken), one gloo hop 110 us at 1.7 GB/s (the same
# within and across "nodes"), the torch backend at 0.7-1.2x its GEMM floor (1.0 taken). A rough profile:
# it is there so that "auto" on CPU weighs hops against compute in the right proportion.
CPU = Hardware("CPU", 50e9, 1.7e9, 1.7e9, latency=110e-6, ranks_per_node=8, kernel_floor=1e-6, ratio=1.0)


def _launches(backend: str, rows: int, cols: int, chunk_rows: int) -> int:
    """Kernel launches of one visit of rows x cols (one pass of the loss: statistics, or gradients): triton
    3 per super-block (a tile kernel and two merges or two gradient GEMMs), torch about 8 per chunk of rows
    (a product and its elementwise passes), dense about 6."""
    if backend == "triton":
        return 3 * math.ceil(rows / SUPER) * math.ceil(cols / SUPER)
    if backend == "torch":
        return 8 * math.ceil(rows / max(chunk_rows, 1))
    return 6


def _visit(s: Any, hw: Hardware, cols: int, passes: int, ratio: Optional[float] = None) -> float:
    """Seconds of one visit of the rank's b images against `cols` texts, `passes` GEMM-sized passes."""
    if s.b == 0 or cols == 0:
        return 0.0
    flops = passes * 2.0 * s.b * cols * s.dim
    chunk = min(s.b, max(16, s.tiles // (2 * s.c * max(cols, 1)))) if s.backend == "torch" else s.b
    floor = _launches(s.backend, s.b, cols, chunk) * hw.kernel_floor * (2 if passes == 4 else 1)  # CLIP: 2 visits
    return max((ratio or hw.ratio or RATIO[(s.backend, s.loss)]) * flops / hw.gemm_flops, floor)


def _hop_bw(w: int, hw: Hardware) -> float:
    """The slowest link of a flat ring of w ranks."""
    return hw.inter_bw if w > hw.ranks_per_node else hw.intra_bw


def _collective(nbytes: float, w: int, hw: Hardware) -> tuple[float, float, float]:
    """(transfer, latency, bytes over this rank's NIC) of one NCCL collective whose rank sends `nbytes`.
    Its ring runs ranks_per_node channels, one per NIC: each node boundary carries 1/ranks_per_node of the
    data per NIC."""
    t, inter = nbytes / hw.intra_bw, 0.0
    if w > hw.ranks_per_node:
        inter = nbytes / hw.ranks_per_node
        t = max(t, inter / hw.inter_bw)
    return t, 2 * math.ceil(math.log2(w)) * hw.latency, inter


def _hierarchical(s: Any, hw: Hardware, out: dict[str, float], ratio: Optional[float]) -> None:
    """The node-aware ring's passes into `out` (predicted: modelled from its design, before a run). R ranks a
    node, M = W / R nodes, M steps a pass. A step: the slice (n rows, the largest) and, one hop behind, its
    accumulator go to the same local rank of the next node over InfiniBand (all R NICs of a node at once),
    overlapped with an intra-node all-gather of the R slices ((R-1) slices a rank over NVLink), ONE visit of
    the b x R*n node block and a reduction of its contributions to the slice owners (terms.node_reduction:
    a reduce-scatter, (R-1) accumulators, on CUDA; gloo's all-reduce, twice that, on CPU; CLIP's column lse two
    all-reduces on both); the intra-node collectives wait for their data. So a step is max(inter, all-gather +
    visit + reduction) at overlap 1; hops: one inter a step (and the accumulators' last one home),
    2 * ceil(log2 R) for the all-gather and for the reduction (as if each were one collective call)."""
    r, m = s.node, s.nodes
    hops = 2 * math.ceil(math.log2(r))
    for k, (gemms, blk, kb, acc, ka) in enumerate(passes(s)):
        c = _visit(s, hw, r * s.n, gemms, ratio)
        ag, (rs, calls) = (r - 1) * blk, node_reduction(s, k) if r > 1 else (0, 0)
        local = ag / hw.intra_bw + rs / hw.intra_bw
        for t in range(m):
            inter = (blk if t < m - 1 else 0) + (acc if t > 0 else 0)
            x = inter / hw.inter_bw
            out["compute_s"] += c
            out["transfer_s"] += x + local
            out["hidden_s"] += hw.overlap * min(x, local + c)
            out["latency_s"] += hw.latency * ((m > 1) + 2 * hops)
            out["messages"] += (kb if t < m - 1 else 0) + (ka if t > 0 else 0) + (kb + calls if r > 1 else 0)
            out["bytes_inter"] += inter
            out["bytes_intra"] += ag + rs
        if m > 1:  # the accumulators' last hop home
            out["transfer_s"] += acc / hw.inter_bw
            out["latency_s"] += hw.latency
            out["messages"] += ka
            out["bytes_inter"] += acc


def step_time(s: Any, hw: Hardware, ratio: Optional[float] = None) -> dict[str, float]:
    """The terms of one loss step (forward + backward) on the busiest rank; time_s is their total.
    `s` is a plan.Shape (b, n the largest rank's images and texts; even splits for the message count).
    bytes_intra + bytes_inter and messages are what strategies/_comm.py counts (benchmarks/time_model_check.py).
    ratio: the kernels' time over their GEMM floor (None: RATIO's figure for the backend and loss)."""
    w, n, d = s.world, s.n, s.dim
    clip, ids = s.loss == "clip", bool(s.idb)
    if s.strategy == "hierarchical" and (s.node != hw.ranks_per_node or w % s.node):
        raise ValueError(f"hierarchical: the shape's ranks per node ({s.node}) must be the hardware's "
                         f"({hw.ranks_per_node}) and divide the world ({w})")
    out = {"compute_s": 0.0, "transfer_s": 0.0, "latency_s": 0.0, "hidden_s": 0.0, "messages": 0,
           "bytes_intra": 0.0, "bytes_inter": 0.0}
    if s.strategy == "local" or w == 1:
        out["compute_s"] = _visit(s, hw, s.N, 4 if clip else 3, ratio)
        out["time_s"] = out["compute_s"]
        return out
    link = "bytes_inter" if w > hw.ranks_per_node else "bytes_intra"

    def collective(nbytes: float) -> None:
        t, lat, inter = _collective(nbytes, w, hw)
        out["transfer_s"] += t
        out["latency_s"] += lat
        out["messages"] += 1
        out["bytes_intra"] += nbytes - inter
        out["bytes_inter"] += inter

    collective((w - 1) * LAYOUT_BYTES)  # the layout exchange (a row of int64 to each peer)
    if clip and ids:
        collective(int(2 * (w - 1) / w * 16))  # rows and columns with a positive
    if s.strategy == "hierarchical":
        _hierarchical(s, hw, out, ratio)
    elif s.strategy == "ring":
        bw = _hop_bw(w, hw)
        for gemms, blk, kb, acc, ka in passes(s):
            c = _visit(s, hw, n, gemms, ratio)
            for t in range(w):
                nbytes = (blk if t < w - 1 else 0) + (acc if t > 0 else 0)
                m = nbytes / bw
                out["compute_s"] += c
                out["transfer_s"] += m
                out["hidden_s"] += hw.overlap * min(c, m)
                out["latency_s"] += hw.latency
                out["messages"] += (kb if t < w - 1 else 0) + (ka if t > 0 else 0)
                out[link] += nbytes
            out["transfer_s"] += acc / bw  # the accumulators' last hop home
            out["latency_s"] += hw.latency
            out["messages"] += ka
            out[link] += acc
    else:
        out["compute_s"] = _visit(s, hw, s.N, 4 if clip else 3, ratio)

        def reduce(width: int) -> None:  # (N, width) to the owners: NCCL reduce-scatters, gloo all-reduces
            collective((w - 1) * n * width if s.device == "cuda" else int(2 * (w - 1) / w * s.N * width))

        collective((w - 1) * n * d * s.e)  # all-gather the texts
        if ids:
            collective((w - 1) * n * 8)  # and their ids
        reduce(d * s.c)  # the text gradients
        if clip:
            collective(int(2 * (w - 1) / w * s.N * 8))  # the column lse: max, then sum
            collective(int(2 * (w - 1) / w * s.N * 8))
            if ids:
                reduce(16)  # positive counts and sums
            for _ in range(1 + ids):  # backward: the column statistics [and targets] gathered again
                collective((w - 1) * n * 8)
    out["time_s"] = out["compute_s"] + out["transfer_s"] + out["latency_s"] - out["hidden_s"]
    return out
