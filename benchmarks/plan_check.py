"""`megabatch plan` against measurement: per-rank peak memory of one loss forward+backward (from the
torch CPU allocator's own events) and bytes sent, on W gloo processes, next to the planner's numbers.

    python benchmarks/plan_check.py [--world 1 2 3 4 8] [--batch 128 1000 4096 8192] [--dim 256] [--json out.json]

Each W runs one world of W spawned processes (one thread each, a file rendezvous) that goes
through every (loss, strategy, B) case; for each, every rank runs one warm-up step, then one
profiled step: the peak of the running sum of the allocator's [memory] events (as
benchmarks/memory_accounting.py does, so Python's and gloo's own memory do not blur it) is the
loss's forward+backward beyond its inputs, and `_comm.count_bytes()` gives the bytes the rank
sends (the ring cost model the planner predicts). The largest rank is compared with the planner's
peak_bytes and sent_bytes; a peak passes within --tolerance or --abs-tolerance (whichever is larger:
at b of a few hundred rows the peak is well under a MiB, and the allocator's small blocks are not the
planner's business), bytes sent must match exactly. B need not divide by W: rank r holds
B // W + (r < B % W) rows, as a data loader's even split gives, and the planner plans the largest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch import plan  # noqa: E402
from megabatch.bench.allocator import peak_live_bytes  # noqa: E402
from megabatch.bench.harness import make_inputs  # noqa: E402



def _rank(rank: int, world: int, init: str, cases: list[dict[str, Any]], queue: Any) -> None:
    import megabatch as mb
    from megabatch.strategies import _comm

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
    for i, case in enumerate(cases):
        b = case["batch"] // world + (rank < case["batch"] % world)
        x, y, s, bias = make_inputs(b, case["dim"], case["dtype"], torch.device("cpu"), seed=1000 + rank)
        strategy = case["strategy"] if world > 1 else "local"

        def step() -> None:
            for t in (x, y, s, bias):
                t.grad = None
            kw = dict(strategy=strategy, backend="torch")
            loss = mb.clip_loss(x, y, s, **kw) if case["loss"] == "clip" else mb.siglip_loss(x, y, s, bias, **kw)
            loss.backward()

        step()  # warm-up
        for t in (x, y, s, bias):
            t.grad = None
        if world > 1:
            dist.barrier()
        with _comm.count_bytes() as sent:
            peak = peak_live_bytes(step)
        queue.put((i, rank, peak, sent[0]))
        del x, y, s, bias
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(cases: list[dict[str, Any]], world: int) -> list[list[tuple[int, int, int]]]:
    """For each case, [(rank, peak live bytes, bytes sent)], measured on one world of `world` processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out: list[list[tuple[int, int, int]]] = [[] for _ in cases]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "rdzv"), cases, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            for _ in range(world * len(cases)):
                i, rank, peak, sent = queue.get(timeout=600)
                out[i].append((rank, peak, sent))
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return [sorted(r) for r in out]


def compare(case: dict[str, Any], world: int, ranks: list[tuple[int, int, int]]) -> dict[str, Any]:
    predicted = plan.plan(loss=case["loss"], strategy=case["strategy"] if world > 1 else "local", backend="torch",
                          world=world, batch=case["batch"], dim=case["dim"], dtype=case["dtype"], device="cpu")
    peak = max(p for _, p, _ in ranks)
    sent = max(s for _, _, s in ranks)
    return {**case, "world": world, "measured_peak_bytes": peak, "predicted_peak_bytes": predicted.peak_bytes,
            "peak_error": predicted.peak_bytes / peak - 1, "measured_sent_bytes": sent,
            "predicted_sent_bytes": predicted.sent_bytes,
            "sent_error": (predicted.sent_bytes / sent - 1) if sent else float(predicted.sent_bytes != 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--loss", nargs="+", default=["clip", "siglip"])
    p.add_argument("--strategy", nargs="+", default=["ring", "gather"])
    p.add_argument("--tolerance", type=float, default=0.10, help="relative peak error allowed")
    p.add_argument("--abs-tolerance", type=float, default=2**20, help="or this many bytes, if larger")
    p.add_argument("--json")
    args = p.parse_args()
    rows, bad = [], 0
    print(f"torch {torch.__version__}, CPU, backend torch, D = {args.dim}, {args.dtype}; peak = max over ranks")
    print(f"{'loss':7}{'strategy':9}{'W':>3}{'B':>7}{'peak MiB':>10}{'plan MiB':>10}{'err':>8}"
          f"{'sent MiB':>10}{'plan MiB':>10}{'err':>8}")
    for world in args.world:
        cases = [dict(loss=loss, strategy=strategy, batch=batch, dim=args.dim, dtype=args.dtype)
                 for loss in args.loss for strategy in (args.strategy if world > 1 else ["local"])
                 for batch in args.batch]
        for case, ranks in zip(cases, measure(cases, world)):
            r = compare(case, world, ranks)
            rows.append(r)
            r["peak_ok"] = abs(r["predicted_peak_bytes"] - r["measured_peak_bytes"]) <= max(
                args.tolerance * r["measured_peak_bytes"], args.abs_tolerance)
            ok = r["peak_ok"] and r["measured_sent_bytes"] == r["predicted_sent_bytes"]
            bad += not ok
            print(f"{r['loss']:7}{r['strategy']:9}{world:>3}{r['batch']:>7}{r['measured_peak_bytes'] / 2**20:>10.2f}"
                  f"{r['predicted_peak_bytes'] / 2**20:>10.2f}{100 * r['peak_error']:>7.1f}%"
                  f"{r['measured_sent_bytes'] / 2**20:>10.2f}{r['predicted_sent_bytes'] / 2**20:>10.2f}"
                  f"{100 * r['sent_error']:>7.1f}%{'' if ok else '  <-- off'}", flush=True)
    print(f"{len(rows) - bad}/{len(rows)} within {100 * args.tolerance:.0f}% (or {args.abs_tolerance / 2**20:g} MiB) "
          "and sending exactly the planned bytes")
    if args.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
