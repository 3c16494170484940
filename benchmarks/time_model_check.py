"""The time model (src/megabatch/timemodel.py) held against this machine: W gloo processes on one CPU.

    python benchmarks/time_model_check.py [--batch 1024 4096] [--dim 256] [--json out.json]

For W = 1 and 2 (one thread a process, torch backend, float32), every rank measures its GEMM rate at the
case's shape (torch.mm, b x D @ D x cols) and, at W = 2, one ring hop's latency (8 bytes) and bandwidth
(a 4 MiB block, both ranks sending at once, as a ring step does). The model is then fed those rates
(nothing assumed but the backend's RATIO and the overlap) and compared term by term with what each loss
step measured: bytes and messages per step (`_comm.count_bytes()`: exact, or the model is wrong), the
compute term against the W = 1 step, and the step time at W = 2 with the ring's overlap (1: transfer
hidden behind compute) and without it (0), first with RATIO's GPU figure, then ("fit") with the ratio
the W = 1 step measured (same loss and B), which leaves the transfer, latency and overlap terms to
judge. Prints a table; --json writes the rows and the environment.

    python benchmarks/time_model_check.py --hierarchical [--json out.json]

counts what strategy="hierarchical" sends instead (gloo; W = 4 as 2 nodes x 2 ranks, W = 6 as 3 x 2 and 2 x 3;
8 images and texts a rank, D = 32, float32, torch backend): bytes and messages of the forward and of the
backward pass, CLIP and SigLIP, with and without ids, against the model's per pass
(cost.terms.hierarchical_passes, the layout exchange and CLIP's ids all-reduce in the forward) and per step
(timemodel.step_time), both for device "cpu" (gloo: the node's "sum" reductions are all-reduces) and, for
reference, "cuda" (NCCL: reduce-scatters, half those bytes). No timing: these shapes only count. With --json
an existing file keeps its other rows; its hierarchical rows are replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch import timemodel  # noqa: E402
from megabatch.bench.harness import environment, make_inputs, time_ms  # noqa: E402
from megabatch.plan import shape_of  # noqa: E402
from megabatch.cost.terms import hierarchical_passes  # noqa: E402

CPU = torch.device("cpu")


def _hop(rank: int, world: int, nbytes: int, repeat: int = 7) -> float:
    """Seconds of one ring hop of `nbytes` (send to rank+1, receive from rank-1, at once)."""
    out, inp = torch.zeros(max(nbytes // 4, 1)), torch.empty(max(nbytes // 4, 1))

    def hop() -> None:
        ops = [dist.P2POp(dist.isend, out, (rank + 1) % world), dist.P2POp(dist.irecv, inp, (rank - 1) % world)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return time_ms(hop, repeat, CPU, warmup=2) / 1e3


def _rank(rank: int, world: int, init: str, cases: list[dict[str, Any]], queue: Any) -> None:
    import megabatch as mb
    from megabatch.strategies import _comm

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        small, big = _hop(rank, world, 8), _hop(rank, world, 4 << 20)
        link = {"latency": small, "bw": (4 << 20) / max(big - small, 1e-9)}
    else:
        link = {}
    for i, case in enumerate(cases):
        b, dim = case["batch"] // world, case["dim"]
        cols = case["batch"] if case["strategy"] in ("gather", "local") else b
        a, yt = torch.randn(b, dim), torch.randn(dim, cols)
        gemm_s = time_ms(lambda: torch.mm(a, yt), 5, CPU, warmup=1) / 1e3
        x, y, s, bias = make_inputs(b, dim, "float32", CPU, seed=1000 + rank)

        def step() -> None:
            for t in (x, y, s, bias):
                t.grad = None
            kw = dict(strategy=case["strategy"], backend="torch")
            loss = mb.clip_loss(x, y, s, **kw) if case["loss"] == "clip" else mb.siglip_loss(x, y, s, bias, **kw)
            loss.backward()

        step()
        with _comm.count_bytes() as sent:
            step()
        if world > 1:
            dist.barrier()
        ms = time_ms(step, 3, CPU, warmup=0)
        queue.put((i, rank, {"gemm_flops": 2.0 * b * cols * dim / gemm_s, "step_s": ms / 1e3,
                             "sent_bytes": sent[0], "messages": sent[1], **link}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


HIER = ((4, 2), (6, 2), (6, 3))  # (W, R): 2 nodes x 2 ranks, 3 x 2, 2 x 3
HIER_ROWS, HIER_DIM = 8, 32


def _count_rank(rank: int, world: int, init: str, cases: list[dict[str, Any]], queue: Any) -> None:
    """Bytes and messages this rank sends in a hierarchical loss's forward and in its backward."""
    import megabatch as mb
    from megabatch.strategies import _comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    for i, case in enumerate(cases):
        x, y, s, bias = make_inputs(case["rows"], case["dim"], "float32", CPU, seed=1000 + rank)
        kw: dict[str, Any] = dict(strategy="hierarchical", backend="torch", ranks_per_node=case["node"])
        if case["ids"]:  # pairs repeated within and across ranks: rank r's row j is pair (r * rows + j) // 3
            ids = (torch.arange(case["rows"]) + rank * case["rows"]) // 3
            kw.update(image_ids=ids, text_ids=ids.clone())
        with _comm.count_bytes() as fwd:
            loss = mb.clip_loss(x, y, s, **kw) if case["loss"] == "clip" else mb.siglip_loss(x, y, s, bias, **kw)
        with _comm.count_bytes() as bwd:
            loss.backward()
        queue.put((i, rank, {"fwd": tuple(fwd), "bwd": tuple(bwd)}))
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()


def compare_hierarchical(case: dict[str, Any], world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured per pass (the same on every rank: equal slices) against the model's, for gloo and NCCL."""
    row: dict[str, Any] = {**case, "world": world, "nodes": world // case["node"],
                           "ranks_agree": all(r == ranks[0] for r in ranks)}
    for k in ("fwd", "bwd"):
        row[f"measured_{k}_bytes"] = max(r[k][0] for r in ranks)
        row[f"measured_{k}_messages"] = max(r[k][1] for r in ranks)
    for device in ("cpu", "cuda"):
        shape = shape_of(case["loss"], "hierarchical", "torch", world, world * case["rows"], world * case["rows"],
                         case["dim"], "float32", device, case["ids"], case["node"])
        hw = timemodel.Hardware("count only", 1e12, 1e9, 1e9, ranks_per_node=case["node"])
        t = timemodel.step_time(shape, hw)
        total = (round(t["bytes_intra"] + t["bytes_inter"]), int(t["messages"]))  # shares of a byte: floats
        bwd = hierarchical_passes(shape)[1] if case["loss"] == "clip" else (0, 0)  # the forward: the rest
        model = {"fwd": (total[0] - bwd[0], total[1] - bwd[1]), "bwd": bwd}
        tag = "" if device == "cpu" else "_nccl"
        for k in ("fwd", "bwd"):
            row[f"model{tag}_{k}_bytes"], row[f"model{tag}_{k}_messages"] = model[k]
    row["exact"] = all(row[f"measured_{k}_{q}"] == row[f"model_{k}_{q}"] for k in ("fwd", "bwd")
                       for q in ("bytes", "messages"))
    return row


def measure(cases: list[dict[str, Any]], world: int, target: Any = _rank) -> list[list[dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out: list[list[dict[str, Any]]] = [[] for _ in cases]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, world, os.path.join(tmp, "rdzv"), cases, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            for _ in range(world * len(cases)):
                i, rank, row = queue.get(timeout=600)
                out[i].append(row)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return out


def compare(case: dict[str, Any], world: int, ranks: list[dict[str, Any]], fitted: dict) -> dict[str, Any]:
    m = {k: max(r[k] for r in ranks) for k in ("step_s", "sent_bytes", "messages")}
    rate = min(r["gemm_flops"] for r in ranks)
    hw = timemodel.Hardware("this CPU (gloo)", rate, ranks[0].get("bw", 1e9), ranks[0].get("bw", 1e9),
                            latency=ranks[0].get("latency", 0.0), ranks_per_node=max(world, 1), kernel_floor=0.0)
    shape = shape_of(case["loss"], case["strategy"], "torch", world, case["batch"], case["batch"], case["dim"],
                     "float32", "cpu", False)
    t1, t0 = timemodel.step_time(shape, hw), timemodel.step_time(shape, replace(hw, overlap=0.0))
    # the ratio measured at W = 1 (same loss and B) in place of RATIO's GPU figure: what is left is the
    # transfer, latency and overlap terms
    ratio = fitted.get((case["loss"], case["batch"]))
    f1 = timemodel.step_time(shape, hw, ratio) if ratio else t1
    f0 = timemodel.step_time(shape, replace(hw, overlap=0.0), ratio) if ratio else t0
    passes = 4 if case["loss"] == "clip" else 3
    floor = passes * 2.0 * (case["batch"] // world) * case["batch"] * case["dim"] / rate
    return {**case, "world": world, "gemm_gflops": rate / 1e9, "hop_latency_us": 1e6 * hw.latency,
            "hop_gbps": hw.intra_bw / 1e9, "measured_ms": 1e3 * m["step_s"], "gemm_floor_ms": 1e3 * floor,
            "measured_ratio": m["step_s"] / floor, "model_ratio": timemodel.RATIO[("torch", case["loss"])],
            "model_compute_ms": 1e3 * t1["compute_s"], "model_ms_overlap": 1e3 * t1["time_s"],
            "model_ms_no_overlap": 1e3 * t0["time_s"], "error_overlap": t1["time_s"] / m["step_s"] - 1,
            "error_no_overlap": t0["time_s"] / m["step_s"] - 1, "measured_sent_bytes": m["sent_bytes"],
            "model_sent_bytes": int(t1["bytes_intra"] + t1["bytes_inter"]), "measured_messages": m["messages"],
            "model_messages": t1["messages"], "fitted_ratio": ratio, "fitted_ms_overlap": 1e3 * f1["time_s"],
            "fitted_ms_no_overlap": 1e3 * f0["time_s"], "fitted_error_overlap": f1["time_s"] / m["step_s"] - 1,
            "fitted_error_no_overlap": f0["time_s"] / m["step_s"] - 1}


def check_hierarchical(json_path: str | None) -> None:
    rows = []
    print(f"{'loss':7}{'ids':>4}{'W':>3}{'R':>3}{'fwd B':>8}{'model':>8}{'nccl':>8}{'msgs':>5}{'model':>6}"
          f"{'bwd B':>8}{'model':>8}{'nccl':>8}{'msgs':>5}{'model':>6}  exact")
    for world in sorted({w for w, _ in HIER}):
        cases = [dict(loss=loss, strategy="hierarchical", ids=ids, node=r, rows=HIER_ROWS, dim=HIER_DIM)
                 for w, r in HIER if w == world for loss in ("clip", "siglip") for ids in (False, True)]
        for case, ranks in zip(cases, measure(cases, world, _count_rank)):
            r = compare_hierarchical(case, world, ranks)
            rows.append(r)
            print(f"{r['loss']:7}{int(r['ids']):>4}{world:>3}{r['node']:>3}"
                  + "".join(f"{r[f'measured_{k}_bytes']:>8}{r[f'model_{k}_bytes']:>8}{r[f'model_nccl_{k}_bytes']:>8}"
                            f"{r[f'measured_{k}_messages']:>5}{r[f'model_{k}_messages']:>6}" for k in ("fwd", "bwd"))
                  + f"  {r['exact'] and r['ranks_agree']}", flush=True)
    if json_path:
        path = Path(json_path)
        old = json.loads(path.read_text()) if path.exists() else {"rows": []}
        env = {**environment("cpu", sys.argv), "command": "python " + " ".join(sys.argv)}
        old["rows"] = [r for r in old["rows"] if r["strategy"] != "hierarchical"] + rows
        old["hierarchical_environment"] = env
        path.write_text(json.dumps(old, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--json")
    p.add_argument("--hierarchical", action="store_true", help="count hierarchical's bytes and messages only")
    args = p.parse_args()
    if args.hierarchical:
        return check_hierarchical(args.json)
    rows: list[dict[str, Any]] = []
    fitted: dict[tuple[str, int], float] = {}
    print(f"{'loss':7}{'strategy':9}{'W':>2}{'B':>6}{'GF/s':>7}{'ratio':>7}{'ms':>8}{'model':>8}{'err':>7}"
          f"{'no-ovl':>8}{'err':>7}{'bytes':>10}{'model':>10}{'msgs':>5}{'model':>6}{'fit ovl':>8}{'no-ovl':>8}")
    for world in args.world:
        cases = [dict(loss=loss, strategy=st, batch=batch, dim=args.dim) for loss in ("clip", "siglip")
                 for st in (("ring", "gather") if world > 1 else ("local",)) for batch in args.batch]
        for case, ranks in zip(cases, measure(cases, world)):
            r = compare(case, world, ranks, fitted)
            rows.append(r)
            if world == 1:
                fitted[(r["loss"], r["batch"])] = r["measured_ratio"]
            print(f"{r['loss']:7}{r['strategy']:9}{world:>2}{r['batch']:>6}{r['gemm_gflops']:>7.1f}"
                  f"{r['measured_ratio']:>7.2f}{r['measured_ms']:>8.1f}{r['model_ms_overlap']:>8.1f}"
                  f"{100 * r['error_overlap']:>6.0f}%{r['model_ms_no_overlap']:>8.1f}"
                  f"{100 * r['error_no_overlap']:>6.0f}%"
                  f"{r['measured_sent_bytes']:>10}{r['model_sent_bytes']:>10}{r['measured_messages']:>5}"
                  f"{r['model_messages']:>6}{100 * r['fitted_error_overlap']:>7.0f}%"
                  f"{100 * r['fitted_error_no_overlap']:>7.0f}%", flush=True)
    if args.json:
        env = {**environment("cpu", sys.argv), "command": "python " + " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
