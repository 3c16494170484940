"""`megabatch bench`: time and peak memory of one loss forward+backward, side by side.

    megabatch bench --loss clip siglip --backend torch dense --batch 4096 8192 --dim 64
    megabatch bench --batch 32768 65536 --dim 512 --dtype bfloat16 --peers --json out.json --plot out.png
    torchrun --nproc_per_node 4 -m megabatch.bench --strategy ring gather --batch 2048  # distributed: see
        bench/distributed.py (--batch is then per rank)

For each (loss, method, batch) it reports the median time of forward+backward with features,
logit_scale (and logit_bias) requiring grad; the peak memory beyond what was held before the call
(CUDA: max_memory_allocated; CPU: peak RSS of a fresh process per case, so cases cannot hide in
each other's high-water mark); effective TFLOP/s counting the 3 GEMM-sized passes of the floor
(3 * 2 * B^2 * D); and time / floor3, where floor3 is 3 B x B x D GEMMs at the matrix-multiply
rate measured in the same run. Methods are megabatch backends plus, with --peers, "plain" (the
open_clip way: the dense matrix in the inputs' dtype with autograd; always available) and any
installed peer library. A case that runs out of memory is reported as OOM, not a crash; a method
is not run at a larger batch once it ran out of memory, nor where its last time scaled by B^2
projects past --max-seconds for the case (warm-up plus repeats): inf-cl at B = 1M would take
about 17 minutes. Skipped cases are listed, with the reason. Timing and peak memory are
bench/harness.py's, shared with the distributed mode and the GPU check.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..cli import CommandParser
from ..functional import clip_loss, siglip_loss
from ..kernels import BACKENDS
from ..losses import LOSSES
from ..strategies import STRATEGIES
from . import harness, peers
from .harness import DTYPES, PeakMemory, environment, make_inputs  # noqa: F401 - this module's API before harness.py


@dataclass
class Case:
    loss: str
    method: str
    batch: int
    dim: int
    dtype: str
    device: str
    repeat: int = 3  # timed calls after the peak call; 0: peak memory only (ms and tflops stay None)


@dataclass
class Result:
    case: Case
    ms: Optional[float] = None
    peak_mib: Optional[float] = None
    tflops: Optional[float] = None
    floor_ratio: Optional[float] = None
    error: Optional[str] = None
    times_ms: list[float] = field(default_factory=list)


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    return make_inputs(case.batch, case.dim, case.dtype, torch.device(case.device))


def loss_fn(case: Case) -> Callable[..., torch.Tensor]:
    """The forward to time: (x, y, scale, bias) -> loss, for a megabatch backend or a peer."""
    if case.method in BACKENDS:
        if case.loss == "clip":
            return lambda x, y, s, b: clip_loss(x, y, s, strategy="local", backend=case.method)
        return lambda x, y, s, b: siglip_loss(x, y, s, b, strategy="local", backend=case.method)
    return peers.get(case.method, case.loss)


def _step(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    for t in inputs:
        t.grad = None
    fn(*inputs).backward()


def measure(case: Case) -> Result:
    """Run one case in this process: peak memory on the first step, then timed repeats (harness.measure)."""
    device = torch.device(case.device)
    res = Result(case)
    try:
        fn = loss_fn(case)
        inputs = _inputs(case)
        m = harness.measure(lambda: _step(fn, inputs), device, repeat=case.repeat)
        res.peak_mib, res.times_ms, res.ms = m.peak_mib, m.times_ms, m.ms
        if res.ms is not None:
            res.tflops = 3 * 2 * case.batch**2 * case.dim / (res.ms * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        res.error = "OOM"
    except (RuntimeError, ValueError, TypeError, ImportError) as e:
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        if device.type == "cuda":
            inputs = None
            torch.cuda.empty_cache()
    return res


def skip_reason(prev: Optional[Result], case: Case, max_seconds: float) -> Optional[str]:
    """Why `case` should not run, given the same method's result at the previous (smaller) batch."""
    if prev is None:
        return None
    if prev.error == "OOM":
        return f"skipped: OOM at B={prev.case.batch}"
    if prev.error and prev.error.startswith("skipped"):
        return prev.error
    if prev.ms is None:
        return None
    projected = prev.ms / 1e3 * (case.batch / prev.case.batch) ** 2 * (case.repeat + 1)
    if projected > max_seconds:
        return f"skipped: projected {projected:.0f} s > --max-seconds {max_seconds:g}"
    return None


def _worker(case: Case, queue: "mp.Queue[Result]") -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    queue.put(measure(case))


def measure_isolated(case: Case) -> Result:
    """CPU cases run in a fresh process each, so peak RSS belongs to that case alone."""
    if case.device != "cpu":
        return measure(case)
    ctx = mp.get_context("spawn")
    queue: "mp.Queue[Result]" = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(case, queue))
    proc.start()
    try:
        return queue.get(timeout=3600)
    finally:
        proc.join()


def device_problem(text: str) -> Optional[str]:
    """What is wrong with --device `text` on this machine (None: usable): the device types the bench
    measures are cpu and cuda[:N]; cuda needs a CUDA build of torch and a visible GPU."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if not m or m.group(1) == "cpu" and m.group(2):
        return f"--device must be one of cpu, cuda, cuda:N; got {text!r}"
    if m.group(1) == "cpu":
        return None
    if torch.version.cuda is None and torch.version.hip is None:
        return f"--device {text}: this torch has no CUDA (CPU build, torch {torch.__version__}); use --device cpu"
    if not torch.cuda.is_available():
        return f"--device {text}: no GPU visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES is " \
               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device cpu"
    count = torch.cuda.device_count()
    if m.group(2) and int(m.group(2)) >= count:
        return f"--device {text}: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})"
    return None


def gemm_tflops(dim: int, dtype: str, device: str, size: int = 16384) -> float:
    """Matrix-multiply rate for (n, D) @ (D, n), the shape of one pass (n capped for memory)."""
    dev = torch.device(device)
    n = size if dev.type == "cuda" else min(size, 4096)
    dt = DTYPES[dtype]
    a = torch.randn(n, dim, device=dev).to(dt)
    b = torch.randn(dim, n, device=dev).to(dt)
    ms = harness.time_ms(lambda: torch.mm(a, b), 5, dev, warmup=2)
    return 2 * n * n * dim / (ms * 1e-3) / 1e12


def format_table(results: list[Result]) -> str:
    head = f"{'loss':7}{'method':14}{'batch':>9}{'dim':>6}{'dtype':>10}{'ms':>11}{'peak MiB':>11}{'TFLOP/s':>9}{'/floor3':>9}"
    rows = [head, "-" * len(head)]
    for r in results:
        c = r.case
        if r.error:
            rows.append(f"{c.loss:7}{c.method:14}{c.batch:>9}{c.dim:>6}{c.dtype:>10}  {r.error}")
            continue
        rows.append(
            f"{c.loss:7}{c.method:14}{c.batch:>9}{c.dim:>6}{c.dtype:>10}{r.ms:>11.2f}{r.peak_mib:>11.1f}"
            f"{r.tflops:>9.3f}{r.floor_ratio:>9.2f}"
        )
    return "\n".join(rows)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[Result]] = {}
    for r in results:
        if r.error is None:
            series.setdefault(f"{r.case.loss} / {r.case.method}", []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r.case.batch)
        xs = [r.case.batch for r in rs]
        ax_t.plot(xs, [r.ms for r in rs], marker="o", label=label)
        ax_m.plot(xs, [r.peak_mib for r in rs], marker="o", label=label)
    for ax, name in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    c = results[0].case
    fig.suptitle(f"megabatch bench: D={c.dim}, {c.dtype}, {c.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    first, rest = __doc__.split("\n\n", 1)
    p = CommandParser(prog="megabatch bench", description=" ".join(first.split()), epilog=rest,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES),
                   help="the losses timed (default both)")
    p.add_argument("--backend", nargs="+", default=["auto"], choices=BACKENDS,
                   help="megabatch backends timed (default auto: triton on CUDA, torch on CPU)")
    p.add_argument("--batch", nargs="+", type=int, default=[1024, 4096],
                   help="batch sizes B, each > 0 (default 1024 4096)")
    p.add_argument("--dim", nargs="+", type=int, default=[64], help="feature dimensions D, each > 0 (default 64)")
    p.add_argument("--dtype", nargs="+", type=str.lower, choices=list(DTYPES), default=["float32"],
                   help="feature dtypes, any case (default float32)")
    p.add_argument("--device", type=str.lower, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda when available, else cpu)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats per case, > 0 (median reported; default 3)")
    p.add_argument("--peers", action="store_true", help="also run 'plain' PyTorch and installed peer libraries")
    p.add_argument("--strategy", nargs="+", choices=STRATEGIES,
                   help="distributed mode, under torchrun (default there: ring gather); --batch is per rank")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="skip a case whose projected time (previous batch's, scaled by B^2) exceeds this many "
                   "seconds (a finite number > 0; default 120)")
    p.add_argument("--json", help="write results and environment to this JSON file")
    p.add_argument("--plot", help="write a PNG of time and memory vs batch")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if any(b < 1 for b in args.batch) or any(d < 1 for d in args.dim) or args.repeat < 1:
        build_parser().error("--batch, --dim and --repeat must be positive")
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        build_parser().error(f"--max-seconds must be a finite number > 0 (got {args.max_seconds!r})")
    problem = device_problem(args.device)
    if problem:
        build_parser().error(problem)
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:  # launched by torchrun
        from .distributed import run

        return run(args, argv)
    if args.strategy:
        build_parser().error("--strategy needs torchrun: torchrun --nproc_per_node N -m megabatch.bench ...")
    methods = list(args.backend) + (peers.available(args.device) if args.peers else [])
    left_out = peers.skipped(args.device, tuple(args.loss)) if args.peers else {}
    for peer, why in left_out.items():
        print(f"megabatch bench: peer {peer} skipped: {why}", flush=True)
    results = []
    for dtype in args.dtype:
        for dim in args.dim:
            rate = gemm_tflops(dim, dtype, args.device)
            for loss in args.loss:
                for method in methods:
                    if method in peers.PEERS and loss not in peers.PEERS[method]:
                        continue
                    prev: Optional[Result] = None
                    for batch in sorted(args.batch):
                        case = Case(loss, method, batch, dim, dtype, args.device, args.repeat)
                        why = skip_reason(prev, case, args.max_seconds)
                        res = Result(case, error=why) if why else measure_isolated(case)
                        prev = res
                        if res.ms is not None:
                            floor3_ms = 3 * 2 * batch**2 * dim / (rate * 1e12) * 1e3
                            res.floor_ratio = res.ms / floor3_ms
                        results.append(res)
                        print(format_table([res]).splitlines()[-1], flush=True)
    print()
    print(format_table(results))
    env = environment(args.device, argv)
    print("\n" + ", ".join(f"{k}={v}" for k, v in env.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": [asdict(r) for r in results], "peers_skipped": left_out}, f,
                      indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0
