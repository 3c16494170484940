"""`megabatch plan`: per-rank peak memory and bytes sent of one loss step, before renting GPUs.

    megabatch plan --loss siglip --strategy ring --backend triton --world 64 --batch 1048576 --dim 512 \\
        --dtype bfloat16 --gpu-mem 80GiB
    megabatch plan ... --json          # one object: peak_bytes, sent_bytes, total_bytes, fits, status, options
    megabatch plan ... --time --gpu H200   # + each option's predicted ms/step (cost/time.py)
    megabatch plan ... | head -1           # a reader that goes away ends it quietly (exit status 141)

The table marks the option planned with `<-`: the strategy and backend asked for, or what auto picks, as a
loss call picks it (`auto_choice`, cost.choose: the strategy the time model predicts fastest among those
whose peak fits what --gpu-mem leaves beside the features; the backend as the losses pick it), on the H200
preset's rates (--device cpu: cost.time.CPU's) unless --time and its flags say otherwise; the line under the
table says why. --gpu and the time model's rates need --time.

peak_bytes is what the loss's forward + backward allocates on one rank beyond its inputs (the
(b, D) image and (n, D) text features), at its highest; sent_bytes what one rank sends per step
under the ring cost model of strategies/_comm.py (all_gather (W-1)*n_local, all_reduce
2(W-1)/W*n, reduce_scatter (W-1)/W*n, a point-to-point send n bytes), the count `megabatch bench`
reports. With --act-bytes (the towers' activation bytes per sample) and --micro-batch, total_bytes
adds the GradCache step around the loss: the features of the rank's batch and one micro-batch's
activations (parameters and optimizer state are the user's to add).

Where the formulas come from (B images and N texts in all, b = ceil(B/W) and n = ceil(N/W) on the largest
rank -- uneven batches are planned, as the library takes them --, D, e the
feature element size, c the compute element size (4; 8 for float64), T the torch backend's logit
tile (kernels/torch_chunked.py's TILE_ELEMENTS: this module imports every constant of the kernels; a tile
is min(b, max(16, T / cols)) x cols for the cols texts a visit meets, as that module cuts it),
U_x = b*D*c, U_y = n*D*c, E_x = b*D*e, E_y = n*D*e, V_y = N*D*c):
  * bytes sent: the README's communication table and the strategies' docstrings, term by term,
    plus the layout exchange (cost.LAYOUT_BYTES, 112: 14 int64 to each of W-1 peers) and, with --ids,
    8 bytes per text row wherever a text block travels (ids go with their blocks), and for CLIP the
    positive counts and logit sums (16 bytes per text) with the forward's statistics, the column
    targets (8 more) with the backward's, and an all-reduce of two float64 (rows and columns with a
    positive);
  * memory, torch backend, read off the code and checked on CPU against the allocator's own events
    (benchmarks/plan_check.py, float32, D = 256, B = 4096 and 8192, W = 1..4):
      local         rows finished chunk by chunk into dx: the kernels' compute-dtype copy of the
                    texts (16-bit only, U_y), gy, dx and 2 tiles = [U_y] + U_y + E_x + 2T; CLIP
                    adds 16 bytes of statistics per row; SigLIP's backward holds the saved dx, dy
                    and their scaled copies, 2(E_x + E_y), which is its peak in float32
      ring          per visit: the block held and (W >= 3) the next one arriving (E_y each), the
                    accumulator sent and the one received (U_y each), gx and this visit's gx and
                    gy parts (2 U_x + U_y), 2 tiles; CLIP adds 8 bytes per row per lse travelling
      hierarchical  (predicted) the node block of R = --ranks-per-node slices
                    gathered (R*E_y, + E_y arriving when there are 2+ nodes) and its fp32 gradient
                    contributions (R*U_y), the accumulators sent and received (2 U_y), gx and its part
                    (2 U_x), the tiles of a b x R*n visit; bytes: per pass M-1 inter-node hops of the slice,
                    M of its accumulator and M intra-node all-gathers and reduce-scatters of R-1 slices
      gather        one visit of all N texts (the row side finished chunk by chunk, as local): the
                    gathered texts (N*D*e, kept from forward to backward), the (N, D) compute-dtype
                    text-gradient accumulator, dx and 2 tiles (16-bit: plus the kernels' compute
                    copy of the gathered texts, N*D*c)
    bfloat16 on CPU (W = 1, 2, 4, B = 4096) is within 3%, but 16-bit rows stay marked predicted (a GPU
    has other kernels and allocator);
  * triton backend: benchmarks/memory_accounting.py's measured slopes (CLIP backward and SigLIP
    forward 8 bytes per b*D for 16-bit features: dx 2 + fp32 gy 4 + dy 2) plus the super-block
    scratch (TritonConfig.default's, min(b, 8192) x min(cols, 8192) in the input dtype, as the kernels
    allocate it); distributed triton rows follow the torch
    structure without the per-visit gx part (the kernels accumulate in place): predicted;
  * dense backend: the (b, n) logits and their gradient, 4 (CLIP) or 5 (SigLIP) logit-sized
    buffers (the README's measured dense rows): predicted.
Every row that a GPU has not measured is marked "predicted"; float32 torch-backend rows on CPU are
"checked on CPU" (within 10% at B >= 4096, D = 256; within 1 MiB at b from 16 to 1,024, W up to 8).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import cost, kernels, strategies, timemodel
from .cost import DTYPES, Shape, memory_terms, sent_bytes, shape_of
from .losses import LOSSES

__all__ = ["DTYPES", "Plan", "STRATEGIES", "Shape", "auto_choice", "main", "options", "parse_bytes", "plan",
           "shape_of", "step_times"]

# The concrete names of the library's lists ("auto" is decided first, as the losses decide it)
STRATEGIES = tuple(s for s in strategies.STRATEGIES if s != "auto")
BACKENDS = tuple(b for b in kernels.BACKENDS if b != "auto")
DEVICES = ("cuda", "cpu")


@dataclass
class Plan:
    """One configuration's per-rank numbers (bytes)."""

    loss: str
    strategy: str
    backend: str
    world: int
    batch: int
    texts: int
    dim: int
    dtype: str
    device: str
    ids: bool
    peak_bytes: int
    sent_bytes: int
    inputs_bytes: int
    activation_bytes: int
    total_bytes: int
    status: str
    terms: dict[str, int] = field(default_factory=dict)
    ranks_per_node: int = 8  # hierarchical's R


def plan(loss: str, strategy: str, backend: str, world: int, batch: int, dim: int, dtype: str, *,
         texts: Optional[int] = None, device: str = "cuda", ids: bool = False, act_bytes: int = 0,
         micro_batch: int = 0, ranks_per_node: int = 8) -> Plan:
    """The per-rank numbers of one configuration (see the module docstring). ValueError on bad input."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    if strategies.planned(strategy, world) == "auto":  # the one name check (ValueError for an unknown name)
        raise ValueError("plan() takes a concrete strategy; auto_choice() says what strategy='auto' picks")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    texts = batch if texts is None else texts
    for name, value in (("world", world), ("batch", batch), ("texts", texts), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("act_bytes", act_bytes), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
    if strategy == "hierarchical" and world % ranks_per_node:
        raise ValueError(f"strategy hierarchical groups whole nodes: world ({world}) must be a multiple of "
                         f"--ranks-per-node ({ranks_per_node})")
    if strategy == "local" and world != 1:
        raise ValueError(f"strategy local is one process: world must be 1, got {world}")
    if strategy != "local" and world == 1:
        raise ValueError(f"strategy {strategy} spreads the batch over ranks: world must be >= 2 (one process: local)")
    if backend == "triton" and device == "cpu":
        raise ValueError("backend triton runs on cuda (on CPU only through Triton's interpreter): use --device cuda")
    shape = shape_of(loss, strategy, backend, world, batch, texts, dim, dtype, device, ids, ranks_per_node)
    terms = memory_terms(shape)
    peak = int(sum(terms.values()))
    sent = sent_bytes(shape)
    inputs = shape.ex + shape.ey + (shape.b + shape.n) * shape.idb
    activations = act_bytes * micro_batch
    checked = device == "cpu" and backend == "torch" and dtype == "float32" and not ids and texts == batch
    status = "checked on CPU" if checked and strategy != "hierarchical" else "predicted"
    return Plan(loss, strategy, backend, world, batch, texts, dim, dtype, device, ids, peak, sent, inputs,
                activations, peak + inputs + activations, status, terms, ranks_per_node)


def options(loss: str, world: int, batch: int, dim: int, dtype: str, *, ranks_per_node: int = 8,
            device: str = "cuda", **common: Any) -> list[Plan]:
    """Every strategy x backend `auto` may pick: local on one rank; ring, gather and (world a multiple of
    ranks_per_node) hierarchical on several."""
    names = ("local",) if world == 1 else ("ring", "gather") + (("hierarchical",) if world % ranks_per_node == 0
                                                                 else ())
    return [plan(loss, st, be, world, batch, dim, dtype, device=device, ranks_per_node=ranks_per_node, **common)
            for st in names for be in BACKENDS if not (be == "triton" and device == "cpu")]


def step_times(opts: list[Plan], hw: timemodel.Hardware) -> dict[tuple[str, str], dict[str, float]]:
    """timemodel.step_time of each option, by (strategy, backend)."""
    return {(o.strategy, o.backend): timemodel.step_time(shape_of(
        o.loss, o.strategy, o.backend, o.world, o.batch, o.texts, o.dim, o.dtype, o.device, o.ids, o.ranks_per_node),
        hw) for o in opts}


def auto_choice(loss: str, world: int, batch: int, dim: int, dtype: str, *, backend: str = "auto",
                texts: Optional[int] = None, device: str = "cuda", ids: bool = False,
                hw: Optional[timemodel.Hardware] = None, gpu_mem: Optional[int] = None, act_bytes: int = 0,
                micro_batch: int = 0) -> cost.Choice:
    """What strategy="auto" picks for this configuration, and why: cost.choose, as a loss call decides it
    from its layout exchange, here from the command's sizes (the largest rank's, as shape_of cuts an uneven
    batch). backend "auto": as the losses pick it. hw: the rates (None: the H200 preset on cuda, cost.CPU on
    cpu); its ranks_per_node is hierarchical's R. gpu_mem: a rank's memory (None: no limit); the budget for
    the loss's peak is what it leaves beside the features and one micro-batch's activations (so a pick fits
    exactly where plan's `fits` says so). ValueError on bad input, as `plan`."""
    backend = kernels.auto_backend(device) if backend == "auto" else backend
    hw = hw or (timemodel.CPU if device == "cpu" else timemodel.GPUS[timemodel.DEFAULT_GPU])
    ref = plan(loss, "local" if world == 1 else "ring", backend, world, batch, dim, dtype, texts=texts,
               device=device, ids=ids, act_bytes=act_bytes, micro_batch=micro_batch, ranks_per_node=hw.ranks_per_node)
    base = shape_of(loss, "ring", backend, world, batch, ref.texts, dim, dtype, device, ids)
    budget = None if gpu_mem is None else gpu_mem - ref.inputs_bytes - ref.activation_bytes
    return cost.choose(base, hw, budget, ranks_per_node=hw.ranks_per_node)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '80000MiB' -> bytes. The unit is required: a bare 80 is read as nothing (80 bytes
    is never what was meant), ValueError showing the accepted form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size with its unit, such as 80GiB, 80GB or 80000MiB "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _parser() -> argparse.ArgumentParser:
    from .cli import CommandParser

    p = CommandParser(prog="megabatch plan", description=__doc__.split("\n\n")[0],
                      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=LOSSES, default="clip", help="the loss planned (default clip)")
    p.add_argument("--strategy", choices=("auto", *STRATEGIES), default="auto",
                   help="auto: what the losses pick (the fastest predicted that fits --gpu-mem; local on one "
                        "rank). hierarchical: --world a multiple of --ranks-per-node")
    p.add_argument("--backend", choices=kernels.BACKENDS, default="auto",
                   help="auto: triton on cuda, torch on cpu (as the losses pick)")
    p.add_argument("--world", type=int, default=1, help="ranks W")
    p.add_argument("--batch", type=int, required=True, help="GLOBAL image count B (all ranks)")
    p.add_argument("--texts", type=int, help="global text count N (default: --batch; SigLIP may have more)")
    p.add_argument("--dim", type=int, required=True, help="feature dimension D")
    p.add_argument("--dtype", type=str.lower, choices=tuple(DTYPES), default="bfloat16",
                   help="feature dtype, any case (default bfloat16)")
    p.add_argument("--device", type=str.lower, choices=DEVICES, default="cuda",
                   help="where the loss runs (default cuda)")
    p.add_argument("--ids", action="store_true", help="image/text ids (int64) travel with the features")
    p.add_argument("--act-bytes", type=int, default=0, help="the towers' activation bytes per sample (GradCache)")
    p.add_argument("--micro-batch", type=int, default=0, help="GradCache micro-batch per rank")
    p.add_argument("--gpu-mem", help="memory per rank, e.g. 80GiB: also list which strategies/backends fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    timemodel.add_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    lone = timemodel.without_time(a)
    if lone:  # read only by the time model: without --time it would change nothing, silently
        parser.error(f"{lone} sets the time model: it needs --time")
    backend = a.backend if a.backend != "auto" else kernels.auto_backend(a.device)
    hw = timemodel.hardware(a, a.device)  # its ranks_per_node places hierarchical's nodes with or without --time
    common = dict(texts=a.texts, device=a.device, ids=a.ids, act_bytes=a.act_bytes, micro_batch=a.micro_batch)
    try:
        try:
            gpu_mem = parse_bytes(a.gpu_mem) if a.gpu_mem is not None else None
        except ValueError as e:
            raise ValueError(f"--gpu-mem: {e}") from None
        auto = auto_choice(a.loss, a.world, a.batch, a.dim, a.dtype, backend=backend, hw=hw, gpu_mem=gpu_mem,
                           **common)
        strategy = auto.strategy if a.strategy == "auto" else a.strategy
        chosen = plan(a.loss, strategy, backend, a.world, a.batch, a.dim, a.dtype, ranks_per_node=hw.ranks_per_node,
                      **common)
        opts = options(a.loss, a.world, a.batch, a.dim, a.dtype, ranks_per_node=hw.ranks_per_node, **common)
    except ValueError as e:
        parser.error(str(e))

    def fit(o: Plan) -> Optional[bool]:
        return None if gpu_mem is None else o.total_bytes <= gpu_mem

    times = step_times(opts, hw) if a.time else {}
    if a.json:
        keys = ("strategy", "backend", "peak_bytes", "sent_bytes", "total_bytes", "status")
        rows = [{**{k: getattr(o, k) for k in keys}, "fits": fit(o)} for o in opts]
        for r in rows if a.time else ():
            t = times[(r["strategy"], r["backend"])]
            r.update(time_ms=1e3 * t["time_s"], time_terms=t)
        out: dict[str, Any] = {**asdict(chosen), "gpu_mem_bytes": gpu_mem, "fits": fit(chosen), "options": rows,
                               "auto": {"strategy": auto.strategy, "reason": auto.reason, "hardware": auto.hardware,
                                        "budget_bytes": auto.budget, "candidates": [asdict(c) for c in auto.candidates]}}
        if a.time:
            out.update(time_ms=1e3 * times[(chosen.strategy, chosen.backend)]["time_s"],
                       hardware=timemodel.describe(hw))
        print(json.dumps(out, indent=1))
        return 0
    print(f"{a.loss}, {a.world} rank(s), B = {a.batch} images, N = {chosen.texts} texts (b = {-(-a.batch // a.world)}, "
          f"n = {-(-chosen.texts // a.world)} on the largest rank), D = {a.dim}, {a.dtype} on {a.device}"
          + (", ids" if a.ids else "") + (f"; time on {hw.name} (predicted)" if a.time else ""))
    ms_head = format("ms/step", ">10") if a.time else ""
    print(f"{'strategy':13}{'backend':8}{'peak':>12}{'sent/step':>12}{'total':>12}{ms_head}"
          f"  {'fits' if gpu_mem else ''}")
    for o in opts:
        mark = {None: "", True: "yes", False: "no"}[fit(o)]
        star = " <-" if (o.strategy, o.backend) == (chosen.strategy, chosen.backend) else ""
        ms = f"{1e3 * times[(o.strategy, o.backend)]['time_s']:>10.3f}" if a.time else ""
        print(f"{o.strategy:13}{o.backend:8}{_fmt(o.peak_bytes):>12}{_fmt(o.sent_bytes):>12}{_fmt(o.total_bytes):>12}"
              f"{ms}  {mark:4}{o.status}{star}")
    print("peak: the loss's forward+backward beyond its inputs; total adds the features"
          + (" and one micro-batch's activations" if a.act_bytes and a.micro_batch else "")
          + "; sent: bytes per rank per step (ring cost model)")
    print("<-: the option planned: --strategy and --backend as given, auto as the losses pick it")
    print(f"auto picks {auto.reason}")
    return 0


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command("megabatch plan", main))
