"""The one harness that times a step and measures its peak memory, for every benchmark of the repository:
`megabatch bench` (single.py), its distributed mode under torchrun (distributed.py) and the GPU check
(benchmarks/gpu_check.py and its peers' workers).

    inputs = make_inputs(batch, dim, "bfloat16", device)        # features, scale, bias; all need grad
    m = measure(step, device, repeat=3)                         # peak of the first call, then 3 timed
    m.peak_mib, m.first_ms, m.ms                                # ms: the median of the timed calls
    ms = time_ms(fn, 5, device, warmup=2)                       # timing only (a GEMM, a config)

Time: on CUDA a pair of events brackets each call and the device is synchronised before it is read
(so a short kernel's time is not the host's launch-and-sync round trip); elsewhere the wall clock.
Peak memory (`PeakMemory`): beyond what was held before the call; CUDA: max_memory_allocated; CPU: the
process's RSS high-water mark, reset on entry (Linux clear_refs), so one case cannot hide in another's.
Exact allocator bytes on CPU are bench/allocator.py's (the planner's checks use that).
"""
from __future__ import annotations

import datetime as _dt
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Device = Union[str, torch.device]


def sync(device: Device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch: int, dim: int, dtype: str, device: Device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """L2-normalised random (batch, dim) features, scale 10 and bias -10, all requiring grad. Drawn on
    `device` itself (seeded there): at B = 1M a CPU draw and copy would take seconds per case."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1)
    dt = DTYPES[dtype]
    x = x.to(device=device, dtype=dt).requires_grad_(True)
    y = y.to(device=device, dtype=dt).requires_grad_(True)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return x, y, scale, bias


# ---- peak memory ----------------------------------------------------------------------------------

def _status_mib(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Reset the kernel's RSS high-water mark (Linux: clear_refs 5) and return the current RSS in
    MiB, so the next peak reading belongs to the code that runs in between."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _status_mib("VmRSS")
    return current if current is not None else _peak_rss_mib()


def _peak_rss_mib() -> float:
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakMemory:
    """Context manager: peak memory (MiB) allocated inside the block beyond what was held before it.
    CUDA: max_memory_allocated; CPU: the process's RSS high-water mark (reset on entry)."""

    def __init__(self, device: Device):
        self.device, self.mib = torch.device(device), 0.0

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._before = _reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._before
        else:
            self.mib = max(0.0, _peak_rss_mib() - self._before)


# ---- time ----------------------------------------------------------------------------------------

def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_calls(fn: Callable[[], object], repeat: int, device: Device, *, warmup: int = 0,
               before: Optional[Callable[[], object]] = None) -> list[float]:
    """Milliseconds of each of `repeat` calls of fn(), after `warmup` untimed ones (then a sync).
    `before()` runs untimed ahead of every timed call (the distributed bench's barrier)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if warmup:
        sync(device)
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        times.append(_one_call_ms(fn, device))
    return times


def time_ms(fn: Callable[[], object], repeat: int, device: Device, *, warmup: int = 0,
            before: Optional[Callable[[], object]] = None) -> float:
    """The median of `time_calls` (same arguments)."""
    return statistics.median(time_calls(fn, repeat, device, warmup=warmup, before=before))


@dataclass
class Measured:
    """What `measure` found: the peak call's memory and time, and the timed calls after it."""

    peak_mib: float  # beyond what was held before the peak call
    first_ms: float  # the peak call's own time (with any compilation or autotuning it triggered)
    times_ms: list[float] = field(default_factory=list)

    @property
    def ms(self) -> Optional[float]:
        """The median of the timed calls (None when none was timed)."""
        return statistics.median(self.times_ms) if self.times_ms else None


def measure(step: Callable[[], object], device: Device, *, repeat: int, warmup: int = 0,
            before: Optional[Callable[[], object]] = None, first: Optional[Callable[[], object]] = None) -> Measured:
    """`warmup` untimed calls of step(); then one call under PeakMemory, also timed (`first()` instead
    of step() when given, e.g. step() under a byte counter); then `repeat` timed calls. `before()` runs
    untimed ahead of the peak call and of every timed one (the distributed bench's barrier)."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    if warmup:
        sync(device)
    if before is not None:
        before()
    with PeakMemory(device) as peak:
        first_ms = _one_call_ms(first or step, device)
    return Measured(peak.mib, first_ms, time_calls(step, repeat, device, before=before))


def environment(device: str, argv: list[str]) -> dict[str, str]:
    """Date, versions and machine of a run, and the `megabatch bench` command that made it."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": " ".join(["megabatch", "bench", *argv]),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = str(torch.get_num_threads())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
