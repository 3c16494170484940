"""Per-rank peak memory of ring, gather and hierarchical as the world grows at a fixed local batch,
each checked exact against the float64 reference on the concatenated batch.

    python benchmarks/hierarchical_memory.py [--world 4 8 16] [--batch 128] [--dim 64] [--json out.json]

One world of max(--world) spawned processes (gloo, one thread each, a file rendezvous); each smaller W
runs on the subgroup of ranks 0..W-1 (every rank makes every subgroup; ranks outside one wait at a
barrier). For each (W, loss, strategy) every rank of the group holds b = --batch images and texts
(float64, D = --dim, rows of one global batch), runs one warm-up forward+backward, then one profiled:
its peak is the peak of the running sum of the torch allocator's [memory] events
(megabatch.bench.allocator.peak_live_bytes, as benchmarks/plan_check.py measures), i.e. what the
loss held beyond its inputs, and `_comm.count_bytes()` gives the bytes it sent. The parent compares
the mean loss, W * the feature gradients and the mean logit_scale (and logit_bias) gradient with
megabatch's float64 reference on the whole batch (relative norm error, the largest of them).
hierarchical runs with ranks_per_node R = 2 and 4 (R = W is one node: gather's pattern).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch.bench.allocator import peak_live_bytes  # noqa: E402

RUNS = (("ring", None), ("gather", None), ("hierarchical", 2), ("hierarchical", 4))


def global_batch(world: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (W*b, D) float64 images and texts in every process (text i is image i's positive)."""
    gen = torch.Generator().manual_seed(world)
    x = torch.randn(world * batch, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(world * batch, dim, generator=gen, dtype=torch.float64) + x
    return torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)


def cases(worlds: list[int]) -> list[dict[str, Any]]:
    return [dict(world=w, loss=loss, strategy=s, ranks_per_node=rpn)
            for w in worlds for loss in ("clip", "siglip") for s, rpn in RUNS if rpn is None or rpn <= w]


def _rank(rank: int, world: int, init: str, todo: list[dict[str, Any]], batch: int, dim: int, queue: Any) -> None:
    import megabatch as mb
    from megabatch.strategies import _comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=900))
    groups = {w: dist.new_group(list(range(w))) if w < world else None for w in sorted({c["world"] for c in todo})}
    for i, case in enumerate(todo):
        w = case["world"]
        if rank < w:
            gx, gy = global_batch(w, batch, dim)
            rows = slice(rank * batch, (rank + 1) * batch)
            x, y = gx[rows].clone().requires_grad_(), gy[rows].clone().requires_grad_()
            s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
            kw: dict[str, Any] = dict(strategy=case["strategy"], backend="torch", group=groups[w])
            if case["ranks_per_node"]:
                kw["ranks_per_node"] = case["ranks_per_node"]
            out: dict[str, Any] = {}

            def step() -> None:
                for t in (x, y, s, bias):
                    t.grad = None
                loss = mb.clip_loss(x, y, s, **kw) if case["loss"] == "clip" else mb.siglip_loss(x, y, s, bias, **kw)
                loss.backward()
                out["loss"] = loss.detach()

            step()  # warm-up: connections, node groups, thread pools
            dist.barrier(groups[w])
            with _comm.count_bytes() as sent:
                peak = peak_live_bytes(step)
            grads = [None if t.grad is None else t.grad.numpy().copy() for t in (x, y, s, bias)]
            queue.put((i, rank, peak, sent[0], sent[1], out["loss"].numpy().copy(), *grads))  # numpy: no shared fds
            del x, y, s, bias, out, grads
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


def measure(todo: list[dict[str, Any]], world: int, batch: int, dim: int) -> list[list[tuple]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    expected = sum(c["world"] for c in todo)
    out: list[list[tuple]] = [[] for _ in todo]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "rdzv"), todo, batch, dim, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            for _ in range(expected):
                i, *rest = queue.get(timeout=1200)
                out[i].append(tuple(rest))
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return [sorted(r, key=lambda t: t[0]) for r in out]


def exactness(case: dict[str, Any], ranks: list[tuple], batch: int, dim: int) -> float:
    """The largest relative error of the loss and the gradients against the float64 reference."""
    import megabatch as mb

    w = case["world"]
    gx, gy = global_batch(w, batch, dim)
    x, y = gx.clone().requires_grad_(), gy.clone().requires_grad_()
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    ref = mb.clip_loss_reference(x, y, s) if case["loss"] == "clip" else mb.siglip_loss_reference(x, y, s, bias)
    ref.backward()
    rel = lambda got, want: float((got - want).norm() / want.norm().clamp_min(1e-300))  # noqa: E731
    col = lambda k: [torch.from_numpy(r[k]) for r in ranks]  # noqa: E731
    errs = [rel(torch.stack(col(4)).mean(), ref.detach()), rel(torch.cat(col(5)), w * x.grad),
            rel(torch.cat(col(6)), w * y.grad), rel(torch.stack(col(7)).mean(), s.grad)]
    if case["loss"] == "siglip":
        errs.append(rel(torch.stack(col(8)).mean(), bias.grad))
    return max(errs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batch", type=int, default=128, help="images (and texts) per rank")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args()
    todo = cases(a.world)
    measured = measure(todo, max(a.world), a.batch, a.dim)
    print(f"torch {torch.__version__}, CPU gloo, float64, b = {a.batch} per rank, D = {a.dim}; peak = max over ranks")
    print(f"{'loss':7}{'strategy':16}{'W':>4}{'B':>7}{'peak MiB':>10}{'sent MiB':>10}{'msgs':>6}{'max rel err':>13}")
    rows = []
    for case, ranks in zip(todo, measured):
        name = case["strategy"] + (f" R={case['ranks_per_node']}" if case["ranks_per_node"] else "")
        row = dict(case, batch=a.batch, dim=a.dim, dtype="float64", peak_bytes=[r[1] for r in ranks],
                   sent_bytes=[r[2] for r in ranks], messages=[r[3] for r in ranks],
                   max_rel_err=exactness(case, ranks, a.batch, a.dim))
        rows.append(row)
        print(f"{case['loss']:7}{name:16}{case['world']:>4}{case['world'] * a.batch:>7}"
              f"{max(row['peak_bytes']) / 2**20:>10.3f}{max(row['sent_bytes']) / 2**20:>10.3f}"
              f"{max(row['messages']):>6}{row['max_rel_err']:>13.1e}", flush=True)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": str(os.cpu_count()), "threads_per_rank": "1",
           "command": "python benchmarks/hierarchical_memory.py " + " ".join(sys.argv[1:])}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
