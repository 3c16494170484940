"""`megabatch bench` under torchrun: the distributed strategies, rank by rank.

    torchrun --nproc_per_node 4 -m megabatch.bench --strategy ring gather --batch 2048 --dim 64

--batch is the LOCAL batch of every rank (global B = W * batch). For each (loss, strategy, backend,
batch, D, dtype) every rank runs one untimed warm-up step, then one forward+backward in which it
measures its peak memory beyond what it held before (CUDA: max_memory_allocated; CPU: the peak RSS
since the kernel's high-water mark was reset) and counts the bytes it sends (the strategies'
collectives under the ring cost model, see strategies/_comm.py), then --repeat timed steps that
start together (barrier); the median is reported (all of it bench/harness.py's `measure`). Rank 0
prints one row per rank and writes the JSON. NCCL with one GPU per process when CUDA is available, gloo otherwise.
On CPU, glibc is told to return freed large blocks to the OS at once (a fixed mmap threshold), so a
case's RSS peak is not hidden in pages an earlier case left resident.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..functional import clip_loss, siglip_loss
from ..strategies import _comm
from . import harness
from .harness import environment, make_inputs


@dataclass
class RankResult:
    loss: str
    strategy: str
    backend: str
    world: int
    rank: int
    batch: int  # local
    dim: int
    dtype: str
    device: str
    ms: Optional[float] = None
    peak_mib: Optional[float] = None
    sent_mib: Optional[float] = None
    error: Optional[str] = None


def _fixed_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, which also stops its dynamic growth
    except (OSError, AttributeError):
        pass


def _inputs(r: RankResult, device: torch.device) -> tuple[torch.Tensor, ...]:
    return make_inputs(r.batch, r.dim, r.dtype, device, seed=1000 + r.rank)


def _step(r: RankResult, inputs: tuple[torch.Tensor, ...]) -> None:
    x, y, s, b = inputs
    for t in inputs:
        t.grad = None
    kw = dict(strategy=r.strategy, backend=r.backend)
    loss = clip_loss(x, y, s, **kw) if r.loss == "clip" else siglip_loss(x, y, s, b, **kw)
    loss.backward()


def measure(r: RankResult, device: torch.device, repeat: int) -> RankResult:
    """Fill r with this rank's peak memory, bytes sent and median time (all ranks call together)."""
    sent = [0]

    def counted() -> None:  # the peak step, its bytes sent counted
        with _comm.count_bytes() as total:
            _step(r, inputs)
        sent[0] = total[0]

    try:
        inputs = _inputs(r, device)
        # warm-up (connections, thread pools, allocator); every measured step starts at a barrier
        m = harness.measure(lambda: _step(r, inputs), device, repeat=repeat, warmup=1, before=dist.barrier,
                            first=counted)
        r.peak_mib, r.sent_mib, r.ms = m.peak_mib, sent[0] / 2**20, m.ms
    except torch.cuda.OutOfMemoryError:  # the same shapes everywhere: every rank fails alike
        r.error = "OOM"
    return r


def format_rows(results: list[RankResult]) -> str:
    head = f"{'loss':7}{'strategy':9}{'backend':8}{'W':>3}{'rank':>5}{'b':>7}{'B':>8}{'dim':>6}{'dtype':>10}"
    head += f"{'ms':>10}{'peak MiB':>10}{'sent MiB':>10}"
    rows = [head, "-" * len(head)]
    for r in results:
        row = f"{r.loss:7}{r.strategy:9}{r.backend:8}{r.world:>3}{r.rank:>5}{r.batch:>7}{r.world * r.batch:>8}"
        row += f"{r.dim:>6}{r.dtype:>10}"
        rows.append(row + (f"  {r.error}" if r.error else f"{r.ms:>10.2f}{r.peak_mib:>10.1f}{r.sent_mib:>10.3f}"))
    return "\n".join(rows)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The distributed bench (called by megabatch.bench.main under torchrun)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        _fixed_mmap_threshold()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: list[RankResult] = []
    try:
        for dtype, dim, loss, strategy, backend, batch in (
            (dt, d, lo, st, be, b)
            for dt in args.dtype for d in args.dim for lo in args.loss
            for st in args.strategy or ["ring", "gather"] for be in args.backend for b in args.batch
        ):
            mine = measure(RankResult(loss, strategy, backend, world, rank, batch, dim, dtype, str(device)), device,
                           args.repeat)
            every: list[Any] = [None] * world
            dist.all_gather_object(every, mine)
            results += every
            if rank == 0:
                print("\n".join(format_rows(every).splitlines()[2:]), flush=True)
        if rank == 0:
            print("\n" + format_rows(results))
            env = environment(str(device), argv)
            env.update(world=str(world), backend=dist.get_backend())
            print("\n" + ", ".join(f"{k}={v}" for k, v in env.items()))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0
