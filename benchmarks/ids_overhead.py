"""What positives by ids cost on the torch backend (CPU): forward+backward with ids against ids=None,
and ids=None against an older megabatch (e.g. main before the engine redesign), interleaved in ONE
process so that this machine's several-fold timing swings hit every case alike (median of --repeat).
Each case is timed in wall-clock and in CPU seconds of the process (one torch thread by default:
CPU time then barely depends on what else the machine runs, which wall time on 2 shared cores does).

    git worktree add /tmp/mb-base <commit>      # the baseline's sources (optional)
    PYTHONPATH=src python benchmarks/ids_overhead.py --baseline-src /tmp/mb-base/src --json out.json

Ids are drawn so that each appears ~8 times in the batch (the synthetic set's repeated captions at
B = 4096: 512 training descriptions). Peak memory is the torch allocator's peak live bytes beyond
the inputs (profiler events), per case, measured once.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import megabatch as mb  # noqa: E402
from megabatch.bench.allocator import peak_live_bytes  # noqa: E402


def load_baseline(src: str) -> Any:
    """Import the package under `src`/megabatch as `megabatch_baseline` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location("megabatch_baseline", Path(src) / "megabatch" / "__init__.py",
                                                  submodule_search_locations=[str(Path(src) / "megabatch")])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["megabatch_baseline"] = module
    spec.loader.exec_module(module)
    return module



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--repeats-per-id", type=int, default=8)
    p.add_argument("--baseline-src", help="a megabatch src/ tree to compare ids=None against")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a stable measure)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, D = a.batch, a.dim
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(B, D), dim=-1)
    ids = torch.randint(0, max(1, B // a.repeats_per_id), (B,))
    s, bias = torch.tensor(10.0), torch.tensor(-10.0)
    base = load_baseline(a.baseline_src) if a.baseline_src else None

    def case(lib: Any, kind: str, with_ids: bool) -> Callable[[], None]:
        kw = dict(image_ids=ids, text_ids=ids) if with_ids else {}

        def run() -> None:
            xs, ys, ss, bs = (t.clone().requires_grad_() for t in (x, y, s, bias))
            if kind == "clip":
                loss = lib.clip_loss(xs, ys, ss, backend="torch", strategy="local", **kw)
            else:
                loss = lib.siglip_loss(xs, ys, ss, bs, backend="torch", strategy="local", **kw)
            loss.backward()
        return run

    cases: dict[str, Callable[[], None]] = {}
    for kind in ("clip", "siglip"):
        cases[f"{kind} ids=None"] = case(mb, kind, False)
        cases[f"{kind} ids"] = case(mb, kind, True)
        if base is not None:
            cases[f"{kind} baseline"] = case(base, kind, False)
    for fn in cases.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeat):
        for name, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rows = []
    for name, fn in cases.items():
        kind = name.split()[0]
        med, cmed = statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3
        ref, cref = (statistics.median(t[f"{kind} ids=None"]) * 1e3 for t in (wall, cpu))
        rows.append(dict(case=name, cpu_median_ms=round(cmed, 1), cpu_ratio_to_ids_none=round(cmed / cref, 3),
                         wall_median_ms=round(med, 1), wall_ratio_to_ids_none=round(med / ref, 3),
                         cpu_ms=[round(t * 1e3, 1) for t in cpu[name]], wall_ms=[round(t * 1e3, 1) for t in wall[name]],
                         peak_mib=round(peak_live_bytes(fn) / 2**20, 2)))
        print(f"{name:<18} cpu {cmed:8.1f} ms  x{cmed / cref:5.3f}   wall {med:8.1f} ms  x{med / ref:5.3f}   "
              f"peak {rows[-1]['peak_mib']:7.2f} MiB", flush=True)
    env = dict(date=datetime.date.today().isoformat(), machine=platform.machine(), cpus=os.cpu_count(),
               torch=torch.__version__, threads=torch.get_num_threads(), command=" ".join(sys.argv),
               batch=B, dim=D, repeat=a.repeat, repeats_per_id=a.repeats_per_id)
    if a.json:
        Path(a.json).write_text(json.dumps({"environment": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
