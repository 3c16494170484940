"""The whole GPU check of megabatch in one call of at most --budget seconds (default 480).

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT    # the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check                   # any CPU, seconds

benchmarks/gpu.md says how to call it on the device machine (with the peers' wheels carried in
.whl/) and what to do with its outputs. Sections, in order:
  correctness  the triton backend's loss and every gradient vs float64: bf16/fp16/fp32, odd D,
               several super-blocks, the ids path once the engine has it (gpu_check_correctness.py).
               A FAIL stops the timing sections.
  floor        the cuBLAS rate at the benchmark shapes (16384 x 512 @ 512 x 16384, bf16, and the
               gradient GEMM's 8192 x 8192 @ 8192 x 512): floor3(B) = 3 * 2 B^2 D / rate.
  peers        megabatch vs the peers, bf16, D = 512, B = 32k, 65k, 262k, 1M, one worker process
               per method, a time limit per case, OOMs recorded (gpu_check_peers.py): time, peak
               memory beyond the inputs, time / floor3.
  scale        peak memory at B = 1M (from the peers section, else measured) and one SigLIP
               forward+backward at B = 4M, run only if its projection from 1M fits.
  sweep        a per-kernel profile of the default TritonConfig at B = 65536, then the candidates,
               with the time that is left (the list is ordered most promising first).
The budget is enforced section by section: correctness and peers end by their share of the plan
(PLAN, cumulative from the start of the script, so import, compile and warm-up time count; a section
that finishes early leaves its time to the next); floor, scale and sweep may use everything left
(scale runs the 4M call only if its projection fits). When time runs out a section stops between
cases and the script writes what it has. Files, at most 3, in --out (or
$OUT): gpu_check[_SECTION].json (environment, plan, every row; rewritten after each section and
each peers case), gpu_check[_SECTION].log (this output) and the peers' plot, gpu_check_peers.png
(gpu_check_SECTION_plot.png under --only).
--only SECTION ... runs just those sections (the floor is measured too where ratios need it).
--dry-run runs every section on CPU at toy sizes, the Triton kernels through TRITON_INTERPRET=1
(fp32/fp16: the interpreter has no bf16 dot), and a "stall" method that checks the per-case kill.
Exit status 1 when correctness FAILs, else 0 (a section's own error is recorded in the JSON).
Times and peak memory are measured by megabatch/bench/harness.py, as `megabatch bench` measures them.
Needs torch >= 2.8 and triton >= 3.4 (the GPU machine: torch 2.11, triton 3.6, Python 3.12);
torch.mm's out_dtype= is feature-detected and the path taken is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Optional, TextIO

T0 = time.time()  # the budget counts from here: imports and CUDA start-up are part of the run
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
import megabatch as mb  # noqa: E402
from megabatch.bench import peers as adapters  # noqa: E402
from megabatch.bench.harness import make_inputs, measure, sync, time_ms  # noqa: E402
from megabatch.bench.single import Case, Result, plot  # noqa: E402

import gpu_check_correctness  # noqa: E402
import gpu_check_peers  # noqa: E402

SECTIONS = ("correctness", "floor", "peers", "scale", "sweep")
# Planned seconds on the H200, which starts bare (no Triton cache): compile and warm-up included.
PLAN = {
    "setup": 20,         # python, torch, triton and megabatch imports; the CUDA context; pip of .whl/ (background)
    "correctness": 95,   # ~60 compile (5 kernels x dtypes x EVEN/odd-D variants, ~1 s each) + ~35 of cases
    "floor": 10,         # 5 GEMM shapes, 10 timed each after a warm-up
    "peers": 185,        # workers start together (~15); megabatch ~45 (1M: 2 x ~6 s a loss), siglip_kernel ~30,
                         # memeff ~45 (1M: 2 x ~18 s), open_clip ~10 (OOM at 262k), inf_cl to 262k ~40
    "scale": 110,        # SigLIP at 4M, one call: 16 x its 1M time (~1.35 x floor3 = ~92 s) + inputs
    "sweep": 60,         # what is left: ~4 configs at ~15 s (compile + warm-up + 3 timed, both losses)
}
PRIORITY = ["triton", "siglip_kernel", "memeff", "open_clip", "plain", "inf_cl"]  # peers order: most telling first
RESERVE_S = 5.0  # kept for writing the outputs


@dataclass
class Run:
    """The run's settings and its growing result (written to JSON after every section)."""

    dev: str
    dry: bool
    budget: float
    out: str
    stem: str
    result: dict[str, Any] = field(default_factory=dict)
    # benchmark shapes: the real ones, or toy ones for the dry run
    dtype: str = "bfloat16"
    dim: int = 512
    sizes: tuple[int, ...] = (32768, 65536, 262144, 1048576)
    mem_b: int = 1 << 20
    huge_b: int = 1 << 22
    sweep_b: int = 65536

    def left(self) -> float:
        return self.budget - (time.time() - T0)

    def path(self, suffix: str) -> str:
        return os.path.join(self.out, self.stem + suffix)

    def save(self) -> None:
        tmp = self.path(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.path(".json"))


class Tee:
    """Writes to a stream and to the log file alike."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.log.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


def log(msg: str) -> None:
    print(msg, flush=True)


def loss_step(kind: str, inputs: tuple[torch.Tensor, ...]) -> None:
    """One forward+backward of the triton backend (features, scale and bias requiring grad)."""
    x, y, s, b = inputs
    for t in inputs:
        t.grad = None
    loss = (mb.clip_loss(x, y, s, backend="triton", strategy="local") if kind == "clip" else
            mb.siglip_loss(x, y, s, b, backend="triton", strategy="local"))
    loss.backward()


# ---- 2. the floor --------------------------------------------------------------------------------
def mm_out_dtype(dev: str) -> str:
    """Whether torch.mm takes out_dtype= (fp32 output of 16-bit operands: TritonConfig(grad_gemm="cublas")
    needs it); the answer is recorded, and the floor falls back to plain torch.mm without it."""
    a = torch.randn(32, 32, device=dev).to(torch.bfloat16)
    try:
        c = torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError) as e:
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return "yes" if c.dtype == torch.float32 else f"no (returned {c.dtype})"


def floor(run: Run) -> dict[str, Any]:
    log("\n== 2. cuBLAS rate at the benchmark shapes (the floor) ==")
    n, g = (16384, 8192) if not run.dry else (256, 128)
    d = run.dim
    out_dtype = mm_out_dtype(run.dev)
    shapes = [("logits", "bfloat16", (n, d), (d, n), None), ("logits", "float16", (n, d), (d, n), None),
              ("logits", "float32", (n, d), (d, n), None), ("grad", "bfloat16", (g, g), (g, d), None)]
    if out_dtype == "yes":
        shapes.append(("grad", "bfloat16", (g, g), (g, d), torch.float32))
    rates = {}
    for what, dname, sa, sb, odt in shapes:
        dt = getattr(torch, dname)
        a, b = torch.randn(*sa, device=run.dev).to(dt), torch.randn(*sb, device=run.dev).to(dt)
        fn = (lambda: torch.mm(a, b)) if odt is None else (lambda: torch.mm(a, b, out_dtype=odt))
        ms = time_ms(fn, 20 if not run.dry else 2, run.dev, warmup=1)
        key = f"{what}_{dname}_{sa[0]}x{sa[1]}x{sb[1]}" + ("_out_fp32" if odt is not None else "")
        rates[key] = 2 * sa[0] * sa[1] * sb[1] / ms / 1e9
        log(f"{key:40} {ms:8.3f} ms  {rates[key]:8.1f} TFLOP/s")
        del a, b
    rate = rates[f"logits_{run.dtype}_{n}x{d}x{n}"]
    log(f"torch.mm(out_dtype=): {out_dtype}; floor3(B) = 3 * 2 B^2 D / {rate:.1f} TFLOP/s")
    return dict(tflops=rates, floor_tflops=rate, mm_out_dtype=out_dtype,
                floor_path="torch.mm, output in the inputs' dtype (TF32 for float32)")


def floor3_ms(run: Run, b: int) -> float:
    return 3 * 2 * b * b * run.dim / (run.result["sections"]["floor"]["floor_tflops"] * 1e12) * 1e3


# ---- 3. peers ------------------------------------------------------------------------------------
def install_wheels(wheel_dir: str) -> tuple[Optional[subprocess.Popen], Optional[str], str]:
    """pip-installs the carried peer wheels (no index, no deps) into a temp dir, in the background."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        return None, None, f"no wheels in {wheel_dir}: only the peers already installed here run"
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    proc = subprocess.Popen([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--disable-pip-version-check", "--target", site, *wheels],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, site, "installing " + " ".join(os.path.basename(w) for w in wheels)


def peer_versions() -> dict[str, str]:
    out = {}
    for dist in ("open-clip-torch", "inf-cl", "memeff", "siglip-kernel"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peers_section(run: Run, deadline: float, pip: tuple[Optional[subprocess.Popen], Optional[str], str]) -> dict:
    proc, site, note = pip
    if proc is not None:
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            note = f"pip install of the wheels failed (exit {proc.returncode}): {output[-500:]}"
            shutil.rmtree(site, ignore_errors=True)
            site = None
        else:
            sys.path.insert(0, site)
            importlib.invalidate_caches()
            note = note.replace("installing", "installed")
    log(note)
    avail = adapters.available(run.dev)
    methods = ["triton"] + [p for p in avail if p != "plain"] + (["plain"] if "open_clip" not in avail else [])
    methods.sort(key=lambda m: PRIORITY.index(m) if m in PRIORITY else len(PRIORITY))
    if run.dry:
        methods.append("stall")
    if run.dev == "cuda":
        torch.cuda.empty_cache()  # this process's cached blocks would count against the workers

    so_far: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:  # the JSON holds every case as soon as it is done
        so_far.append(row)
        run.result["sections"]["peers"] = dict(partial=True, rows=so_far)
        run.save()

    res = gpu_check_peers.run(methods, list(run.sizes), run.dim, run.dtype, run.dev, deadline,
                              lambda b: floor3_ms(run, b), [site] if site else [], log,
                              first_s=90.0 if not run.dry else 60.0, max_case_s=60.0 if not run.dry else 30.0,
                              on_row=on_row)
    res.update(wheels=note, versions=peer_versions())
    if site:  # the workers are gone: the installed wheels are no longer needed
        sys.path.remove(site)
        shutil.rmtree(site, ignore_errors=True)
    results = [Result(Case(**r["case"]), ms=r.get("ms"), peak_mib=r.get("peak_mib"), error=r.get("error"))
               for r in res["rows"]]
    if any(r.ms is not None for r in results):
        png = run.path("_peers.png" if run.stem == "gpu_check" else "_plot.png")  # no clash with a full run's
        plot(results, png)
        res["plot"] = os.path.basename(png)
    return res


# ---- 4. scale ------------------------------------------------------------------------------------
def one_call(run: Run, kind: str, b: int) -> dict[str, Any]:
    """One forward+backward at B = b, no warm-up (the kernels compiled at smaller B): time, peak."""
    row: dict[str, Any] = dict(loss=kind, B=b, D=run.dim, dtype=run.dtype)
    try:
        inputs = make_inputs(b, run.dim, run.dtype, torch.device(run.dev))
        m = measure(lambda: loss_step(kind, inputs), run.dev, repeat=0)  # the one call: its peak and its time
        row["ms"], row["peak_gib"] = m.first_ms, m.peak_mib / 1024
        row["floor3_ms"] = floor3_ms(run, b)
        row["floor_ratio"] = row["ms"] / row["floor3_ms"]
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        inputs = None
        if run.dev == "cuda":
            torch.cuda.empty_cache()
    return row


def scale(run: Run) -> dict[str, Any]:
    log(f"\n== 4. peak memory at B={run.mem_b}, one SigLIP forward+backward at B={run.huge_b} ==")
    predicted = 8 * run.mem_b * run.dim / 2**30  # benchmarks/memory_accounting.py: 8 bytes per b*D (16-bit)
    peers_rows = run.result["sections"].get("peers", {}).get("rows", [])
    at_mem = {r["case"]["loss"]: r for r in peers_rows
              if r["case"]["method"] == "triton" and r["case"]["batch"] == run.mem_b and r.get("ms") is not None}
    rows = []
    for kind in ("siglip", "clip"):
        if kind in at_mem:
            r = at_mem[kind]
            row = dict(loss=kind, B=run.mem_b, ms=r["ms"], peak_gib=r["peak_mib"] / 1024, source="peers section")
        elif run.left() > RESERVE_S + 30:
            one_call(run, kind, run.sizes[0])  # compiles (a fresh machine under --only scale): not in the 1M time
            row = dict(one_call(run, kind, run.mem_b), source="measured here (one call)")
        else:
            row = dict(loss=kind, B=run.mem_b, error="skipped: budget spent")
        row["predicted_gib"] = predicted
        rows.append(row)
        log(f"{kind:6} B={run.mem_b}: " + (f"peak {row['peak_gib']:.2f} GiB beyond the inputs (predicted "
                                            f"{predicted:.2f} + constants), {row['ms']:.0f} ms [{row['source']}]"
                                            if "peak_gib" in row else row.get("error", "?")))
    t1 = next((r["ms"] for r in rows if r["loss"] == "siglip" and r.get("ms")), None)
    ratio = (run.huge_b / run.mem_b) ** 2
    projected = t1 / 1e3 * ratio if t1 else 1.5 * floor3_ms(run, run.huge_b) / 1e3
    if projected + 15 > run.left() - RESERVE_S:
        huge = dict(loss="siglip", B=run.huge_b, error=f"skipped: projected {projected:.0f} s, {run.left():.0f} s left")
    else:
        huge = dict(one_call(run, "siglip", run.huge_b), projected_s=projected)
    log(f"siglip B={run.huge_b}: " + (f"{huge['ms'] / 1e3:.1f} s (projected {projected:.0f}), peak "
                                      f"{huge['peak_gib']:.2f} GiB, ratio {huge['floor_ratio']:.2f}"
                                      if huge.get("ms") else huge.get("error", "?")))
    return dict(memory=rows, huge=huge)


# ---- 5. sweep ------------------------------------------------------------------------------------
@contextlib.contextmanager
def triton_config(cfg: Any, dev: str) -> Iterator[None]:
    """backend="triton" with this TritonConfig: megabatch.kernels builds its TritonKernels through
    _triton_kernels(); the check fails loudly if a new build no longer does."""
    import megabatch.kernels as kernels
    from megabatch.kernels.triton_kernels import TritonKernels

    if not hasattr(kernels, "_triton_kernels"):
        raise RuntimeError("megabatch.kernels._triton_kernels is gone: the sweep cannot set a TritonConfig")
    orig = kernels._triton_kernels
    kernels._triton_kernels = lambda: TritonKernels(cfg)
    try:
        if getattr(kernels.get_backend("triton", torch.device(dev)), "config", None) is not cfg:
            raise RuntimeError("get_backend('triton') ignored the patched _triton_kernels: no sweep possible")
        yield
    finally:
        kernels._triton_kernels = orig


def candidates(dry: bool) -> dict[str, Any]:
    from megabatch.kernels.triton_kernels import TritonConfig as C

    if dry:
        return {"interpreter": C.interpreter(), "interp_n64": replace(C.interpreter(), block_n=64)}
    return {  # most promising first: the list is cut where the time ends
        "default": C.default(torch.bfloat16),
        "regs128": C(max_regs=128),  # 2 CTAs/SM for the tile kernels (small spills)
        "n64": C(block_n=64),
        "super16k": C(super_rows=16384, super_cols=16384),
        "s4": C(num_stages=4),
        "cublas_gemms": C(grad_gemm="cublas"),  # needs torch.mm(out_dtype=)
        "regs128_s2": C(max_regs=128, num_stages=2),
        "tile_128x256": C(block_n=256, num_stages=3),
        "gemm_d256": C(gemm_d=256, gemm_k=64, gemm_stages=3),
        "gemm_m256_w8": C(gemm_m=256, gemm_d=128, gemm_k=64),
        "k32_s4": C(block_k=32, num_stages=4),
        "super4k": C(super_rows=4096, super_cols=4096),
        "warps4": C(num_warps=4, gemm_warps=4),
    }


def breakdown(run: Run) -> dict[str, list[tuple[str, int, float]]]:
    """Per-kernel time of one forward+backward per loss at the sweep's B, default config (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for kind in ("siglip", "clip"):
        inputs = make_inputs(run.sweep_b, run.dim, run.dtype, torch.device(run.dev))
        loss_step(kind, inputs)
        sync(run.dev)
        with profile(activities=[ProfilerActivity.CUDA if run.dev == "cuda" else ProfilerActivity.CPU]) as prof:
            loss_step(kind, inputs)
            sync(run.dev)
        rows = []
        for e in prof.key_averages():
            us = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) if run.dev == "cuda" \
                else e.cpu_time_total
            if us > 0:
                rows.append((e.key, e.count, us / 1e3))
        rows.sort(key=lambda r: -r[2])
        log(f"-- {kind}, per kernel: " + "; ".join(f"{n[:40]} x{c} {ms:.2f} ms" for n, c, ms in rows[:6]))
        out[kind] = rows[:15]
    return out


def sweep(run: Run) -> dict[str, Any]:
    b = run.sweep_b
    log(f"\n== 5. TritonConfig sweep, B={b} D={run.dim} {run.dtype} fwd+bwd (ratio to floor3), time left "
        f"{run.left() - RESERVE_S:.0f} s ==")
    rows: list[dict[str, Any]] = []
    try:  # a few seconds: where the default's time goes
        profile_rows: Any = breakdown(run)
    except Exception as e:
        profile_rows = f"{type(e).__name__}: {str(e)[:200]}"
    est, stopped, notes = 20.0, None, []
    cands = candidates(run.dry)
    out_dtype = run.result["sections"]["floor"]["mm_out_dtype"]
    if "cublas_gemms" in cands and not out_dtype.startswith("yes"):  # its gradient GEMMs call torch.mm(out_dtype=)
        del cands["cublas_gemms"]
        notes.append(f"cublas_gemms not run: torch.mm(out_dtype=) {out_dtype}")
        log(notes[-1])
    for name, cfg in cands.items():
        if run.left() - RESERVE_S < est:
            stopped = f"time: {len(cands) - len({r['config'] for r in rows})} configs not run"
            break
        t = time.time()
        for kind in ("siglip", "clip"):
            row: dict[str, Any] = dict(config=name, loss=kind, settings=asdict(cfg))
            try:
                with triton_config(cfg, run.dev):
                    inputs = make_inputs(b, run.dim, run.dtype, torch.device(run.dev))
                    row["ms"] = time_ms(lambda: loss_step(kind, inputs), 3, run.dev, warmup=1)
                    row["floor_ratio"] = row["ms"] / floor3_ms(run, b)
            except Exception as e:  # OutOfResources for a too-large tile, no out_dtype, ...: that is the result
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                inputs = None
            log(f"{name:14} {kind:6} " + (f"{row['ms']:8.2f} ms  ratio {row['floor_ratio']:.3f}" if "ms" in row
                                          else row["error"]))
            rows.append(row)
        est = max(est, time.time() - t)  # the next config compiles too
    return dict(rows=rows, stopped=stopped, notes=notes, profile=profile_rows)


# ---- the run -------------------------------------------------------------------------------------
def environment(run: Run, argv: list[str]) -> dict[str, Any]:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(gpu=torch.cuda.get_device_name() if run.dev == "cuda" else "cpu (dry run)", torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                command=" ".join(["benchmarks/gpu_check.py", *argv]))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the outputs (default: $OUT)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds of wall clock for the whole run")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of peer wheels to pip-install")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, toy sizes: checks the script")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out DIR is required where $OUT is not set")
    if not args.budget > 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run on the GPU machine, or --dry-run")
    return args


def plan(budget: float, only: Optional[list[str]]) -> dict[str, float]:
    """Planned seconds per section: PLAN, scaled down to a smaller budget; with --only, the chosen
    sections in their planned proportion of what the budget leaves after setup."""
    chosen = ["setup", *(only or SECTIONS)]
    total = sum(PLAN[s] for s in chosen)
    factor = min(1.0, budget / total) if not only else budget / total
    return {s: PLAN[s] * factor for s in chosen}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    run = Run(dev="cpu" if args.dry_run else "cuda", dry=args.dry_run, budget=args.budget, out=args.out,
              stem="gpu_check" + ("_" + "_".join(args.only) if args.only else ""))
    if run.dry:  # toy shapes; fp32 (the interpreter's CPU dot has no bf16)
        run = replace(run, dtype="float32", dim=33, sizes=(24, 48), mem_b=48, huge_b=96, sweep_b=40)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill from outside still writes
    old_out, old_err = sys.stdout, sys.stderr
    logf = open(run.path(".log"), "w")
    sys.stdout, sys.stderr = Tee(old_out, logf), Tee(old_err, logf)
    try:
        return check(run, args, argv)
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        signal.signal(signal.SIGTERM, old_term)
        logf.close()


def check(run: Run, args: argparse.Namespace, argv: list[str]) -> int:
    todo = [s for s in SECTIONS if s in (args.only or SECTIONS)]  # always in the sections' order
    planned = plan(run.budget, args.only)
    run.result = dict(env=environment(run, argv), plan_s=planned, budget_s=run.budget, sections={}, used_s={})
    run.result["used_s"]["setup"] = round(time.time() - T0, 1)
    log(json.dumps(run.result["env"]))
    log("plan (H200 seconds, compile and warm-up included): "
        + ", ".join(f"{s} {v:.0f}" for s, v in planned.items()) + f"; total {sum(planned.values()):.0f}")
    need_floor = any(s in todo for s in ("peers", "scale", "sweep"))
    if need_floor and "floor" not in todo:
        todo.insert(0, "floor")  # the ratios need it; ~10 s
    pip = install_wheels(args.wheels) if "peers" in todo else (None, None, "")
    deadline = T0 + planned["setup"]
    failed = None
    for name in todo:
        deadline += planned.get(name, 0.0)
        # correctness and peers end by their share of the plan; the floor (short, needed by the rest),
        # scale and sweep may use all that is left
        end = deadline if name in ("correctness", "peers") and not args.only else T0 + run.budget - RESERVE_S
        if failed:
            run.result["sections"][name] = dict(skipped=failed)
            log(f"\n== {name}: skipped ({failed})")
            continue
        why = ("budget spent before it began" if time.time() > end else
               "needs the floor, which did not run" if name != "correctness" and name != "floor"
               and "floor_tflops" not in run.result["sections"].get("floor", {}) else None)
        if why:
            run.result["sections"][name] = dict(skipped=why)
            log(f"\n== {name}: skipped ({why})")
            continue
        t = time.time()
        try:
            if name == "correctness":
                res = gpu_check_correctness.run(run.dev, run.dry, end, log)
                if res["failed"]:
                    failed = (f"correctness FAILED ({res['failed']} rows): fix that first; "
                              "--only SECTION runs one anyway")
            elif name == "floor":
                torch.set_float32_matmul_precision("high")  # timings: fp32 on TF32, kernels and floor alike
                res = floor(run)
            elif name == "peers":
                res = peers_section(run, end, pip)
            elif name == "scale":
                res = scale(run)
            else:
                res = sweep(run)
        except Exception as e:  # a bug in one section must not cost the others their time
            traceback.print_exc()
            res = dict(run.result["sections"].get(name, {}), error=f"{type(e).__name__}: {e}")  # keeps partial rows
            if name == "floor":
                failed = "the floor failed: no ratios"
        run.result["sections"][name] = res
        run.result["used_s"][name] = round(time.time() - t, 1)
        run.save()
    if pip[0] is not None and pip[0].poll() is None:  # the peers section never ran: end the pip
        pip[0].kill()
        pip[0].wait()
    if pip[1]:
        shutil.rmtree(pip[1], ignore_errors=True)
    run.result["used_s"]["total"] = round(time.time() - T0, 1)
    run.save()
    log("\nsection      planned  used")
    for name in ["setup", *todo]:
        used = run.result["used_s"].get(name, "-")
        log(f"{name:12} {planned.get(name, 0):7.0f}  {used}")
    log(f"wrote {', '.join(sorted(os.listdir(run.out)))} in {run.out} after {time.time() - T0:.0f} s")
    log(f"planned: {sum(planned.values()):.0f} s")
    return 1 if failed and failed.startswith("correctness") else 0


if __name__ == "__main__":
    sys.exit(main())
