"""Peak memory as the torch allocator itself sees it: exact to the byte on CPU, unlike peak RSS.

`peak_live_bytes(fn)` runs fn() under the profiler with memory events on and returns the maximum,
over time, of bytes allocated minus bytes freed, counted from zero when fn starts: what fn held at
its highest beyond what existed before it (benchmarks/memory_accounting.py, plan_check.py and
ids_overhead.py measure with it).
"""
from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def peak_live_bytes(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
