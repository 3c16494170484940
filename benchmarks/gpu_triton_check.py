"""One-call GPU check of megabatch's `triton` backend: correctness, then speed against the GEMM floor.

    PYTHONPATH=src python benchmarks/gpu_triton_check.py --out $OUT/triton_check.json

Sections, each skipped once the time budget (--budget, default 480 s) is spent:
1. correctness: loss and every gradient through the public API (backend="triton",
   strategy="local") vs the float64 reference, bf16/fp16/fp32, odd D, several super-blocks;
   pass = error <= 2 x max(plain PyTorch's error, the torch backend's error) + floor.
2. cuBLAS rate of one 16384 x D @ D x 16384 GEMM per (dtype, D), measured here: floor3(B) =
   3 * 2 B^2 D / rate (SigLIP's floor), floor4 = 4/3 floor3 (CLIP's: stats pass + 3).
3. timings: forward+backward (features, logit_scale and logit_bias all requiring grad) and
   forward-only, B from 32k up, D = 512 and 1152, bf16 (fp16/fp32 at small B); peak memory =
   max_memory_allocated during the call minus what was allocated before (input grads included).
4. a per-kernel breakdown (torch.profiler) at B = 65536, D = 512, bf16.
5. a sweep of TritonConfig candidates at B = 65536, D = 512, bf16 (tuning: pick the fastest).
Prints a table per section and writes everything to --out as JSON. Needs torch with CUDA and
triton (APIs present in torch >= 2.8 and triton >= 3.4). `--dry-run` runs every section on CPU
through Triton's interpreter at toy sizes, to check the script itself without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Optional

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit is imported
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import megabatch as mb  # noqa: E402
from megabatch.kernels.triton_kernels import TritonConfig, TritonKernels  # noqa: E402
from megabatch.reference import clip_loss_reference, siglip_loss_reference  # noqa: E402
from megabatch.strategies import local  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
T0 = time.time()
DEV = "cuda"
DRY = False  # --dry-run: CPU + interpreter, toy sizes


def left(budget: float) -> float:
    return budget - (time.time() - T0)


def features(b: int, d: int, dtype: torch.dtype, seed: int = 0, grad: bool = False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(b, d, device=DEV, generator=g)
    y = 0.6 * x + 0.8 * torch.randn(b, d, device=DEV, generator=g)
    x, y = F.normalize(x, dim=-1).to(dtype), F.normalize(y, dim=-1).to(dtype)
    return x.requires_grad_(grad), y.requires_grad_(grad)


def loss_fn(kind: str, kernels: Optional[TritonKernels] = None) -> Callable:
    if kernels is not None:
        return (lambda x, y, s, b: local.clip(x, y, s, kernels)) if kind == "clip" else \
               (lambda x, y, s, b: local.siglip(x, y, s, b, kernels))
    if kind == "clip":
        return lambda x, y, s, b: mb.clip_loss(x, y, s, backend="triton", strategy="local")
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, backend="triton", strategy="local")


# ---- 1. correctness ------------------------------------------------------------------------------
def plain(kind: str, x, y, s, b):
    logits = s * x @ y.T
    if kind == "clip":
        labels = torch.arange(x.shape[0], device=x.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device) - 1
    return -F.logsigmoid(z * (logits + b)).sum() / x.shape[0]


def grads_of(fn: Callable, x, y, s: float, b: float, dtype, scalar_dtype):
    leaves = [x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_(),
              torch.tensor(s, dtype=scalar_dtype, device=DEV, requires_grad=True),
              torch.tensor(b, dtype=scalar_dtype, device=DEV, requires_grad=True)]
    loss = fn(*leaves)
    loss.backward()
    out = [loss.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad]
    return out + ([leaves[3].grad] if leaves[3].grad is not None else [])


def rel(o, r, unit: float) -> float:
    return ((o.double() - r.double()).norm() / r.double().norm().clamp_min(unit)).item()


def correctness(budget: float) -> list[dict]:
    print("\n== correctness vs float64 (rel. norm error; tol = 2 x max(plain, torch) + floor) ==")
    rows = []
    cases = [(1, 3), (7, 17), (300, 129), (4096, 512), (3000, 1152), (20000, 512)] if not DRY else [(7, 17), (40, 33)]
    for kind in ("clip", "siglip"):
        for dname, dtype in DTYPES.items():
            if DRY and dtype == torch.bfloat16:
                continue  # the interpreter cannot multiply bf16 on CPU
            for b, d in cases:
                if left(budget) < 0:
                    return rows
                s, bias = (30.0, -10.0) if b % 2 else (100.0, -12.0)
                x, y = features(b, d, torch.float64, seed=b + d)
                ref_fn = (lambda x, y, s, b_: clip_loss_reference(x, y, s)) if kind == "clip" else siglip_loss_reference
                ref = grads_of(ref_fn, x, y, s, bias, torch.float64, torch.float64)
                base = grads_of(lambda *a: plain(kind, *a), x, y, s, bias, dtype, dtype)
                api = mb.clip_loss if kind == "clip" else mb.siglip_loss
                chunk = grads_of(lambda x_, y_, s_, b_: (api(x_, y_, s_, backend="torch", strategy="local")
                                                        if kind == "clip" else
                                                        api(x_, y_, s_, b_, backend="torch", strategy="local")),
                                 x, y, s, bias, dtype, torch.float32)
                ours = grads_of(loss_fn(kind), x, y, s, bias, dtype, torch.float32)
                for name, o, r, p, c in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], ours, ref, base, chunk):
                    unit = 1.0 if name == "loss" else 1e-6
                    err, pe, te = rel(o, r, unit), rel(p, r, unit), rel(c, r, unit)
                    tol = 2 * max(pe, te) + FLOOR[dtype]
                    ok = bool(err <= tol and torch.isfinite(o).all())
                    rows.append(dict(loss=kind, dtype=dname, B=b, D=d, quantity=name, err=err, plain_err=pe,
                                     torch_err=te, tol=tol, ok=ok))
                    if not ok or name == "loss":
                        print(f"{kind:6} {dname} B={b:<6} D={d:<5} {name:8} err {err:.2e} plain {pe:.2e} "
                              f"torch {te:.2e} {'ok' if ok else 'FAIL'}")
                del x, y, ref, base, chunk, ours
                empty_cache()
    bad = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} within tolerance")
    return rows


# ---- 2. cuBLAS rate ------------------------------------------------------------------------------
def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def cuda_time(fn: Callable, reps: int, warm: bool = True) -> float:
    """Median milliseconds of fn() over reps (after one warm-up call if warm); CUDA events on the GPU."""
    if warm:
        fn()
        sync()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def cublas_rate(dtype: torch.dtype, d: int) -> float:
    """TFLOP/s of 16384 x d @ d x 16384 (TF32 for fp32), the rate that defines floor3."""
    n = 16384 if not DRY else 256
    a, b = torch.randn(n, d, device=DEV).to(dtype), torch.randn(d, n, device=DEV).to(dtype)
    ms = cuda_time(lambda: torch.mm(a, b), 10 if not DRY else 1)
    return 2 * n * n * d / ms / 1e9


# ---- 3. timings ----------------------------------------------------------------------------------
def run_once(kind: str, x, y, s, b, fn: Callable, backward: bool) -> None:
    if backward:
        for t in (x, y, s, b):
            t.grad = None
        fn(x, y, s, b).backward()
    else:
        with torch.no_grad():
            fn(x, y, s, b)


def timing(kind: str, b: int, d: int, dtype: torch.dtype, fn: Callable, backward: bool, budget: float,
           once: bool = False) -> dict:
    """Median time of fn's forward(+backward) and its peak memory beyond the inputs (the input
    gradients included: they are freed before `before` is read). once: a single timed call, no
    warm-up (B = 4M, where one call is minutes; compilation happened at the smaller sizes)."""
    row: dict[str, Any] = dict(loss=kind, B=b, D=d, dtype=str(dtype).split(".")[-1], backward=backward)
    try:
        x, y = features(b, d, dtype, grad=True)
        s = torch.tensor(30.0, device=DEV, requires_grad=True)
        bias = torch.tensor(-10.0, device=DEV, requires_grad=True)
        sync()
        reps = 1
        if not once:
            t = time.time()
            run_once(kind, x, y, s, bias, fn, backward)  # warm-up (and compile)
            sync()
            first = time.time() - t
            reps = max(1, min(5, int(left(budget) / 4 / max(first, 1e-3))))
        for t_ in (x, y, s, bias):
            t_.grad = None
        empty_cache()
        if DEV == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        row["ms"] = cuda_time(lambda: run_once(kind, x, y, s, bias, fn, backward), reps, warm=not once)
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30 if DEV == "cuda" else 0.0
        row["reps"] = reps
    except torch.cuda.OutOfMemoryError:
        row["ms"] = None
        row["error"] = "OOM"
    finally:
        x = y = None
        empty_cache()
    return row


def timings(args, rates: dict, budget: float) -> list[dict]:
    print("\n== timings (ms; ratio = time / floor3; CLIP's own floor is 1.33) ==")
    plan = [("bf16", 512, args.sizes), ("bf16", 1152, [s for s in args.sizes if s <= args.max_1152]),
            ("fp16", 512, args.sizes[:2]), ("fp32", 512, args.sizes[:2])]
    if args.huge:  # B = 4M, bf16, D = 512, fwd+bwd, one call each: does it run, and its peak memory
        plan = [("bf16", 512, args.huge)]
    if DRY:  # the interpreter: no bf16, toy D (the floor's rate is then a CPU number, meaningless)
        plan = [("fp32", 33, args.sizes), ("fp16", 17, args.sizes[:1])]
    rows = []
    for dname, d, sizes in plan:
        dtype = DTYPES[dname]
        for b in sizes:
            for kind in ("siglip", "clip"):
                for backward in (True,) if args.huge else (True, False):
                    if left(budget) < 0:
                        return rows
                    row = timing(kind, b, d, dtype, loss_fn(kind), backward, budget, once=bool(args.huge))
                    floor3 = 3 * 2 * b * b * d / (rates[(dname, d)] * 1e12) * 1e3
                    row["floor3_ms"] = floor3
                    if row.get("ms") is not None:
                        row["ratio"] = row["ms"] / floor3
                        print(f"{kind:6} {dname} D={d:<5} B={b:<8} {'fwd+bwd' if backward else 'fwd    '} "
                              f"{row['ms']:10.2f} ms  floor3 {floor3:9.2f}  ratio {row['ratio']:.3f}  "
                              f"peak {row['peak_gib']:.2f} GiB")
                    else:
                        print(f"{kind:6} {dname} D={d:<5} B={b:<8} {row.get('error')}")
                    rows.append(row)
    return rows


# ---- 4. per-kernel breakdown ---------------------------------------------------------------------
def breakdown(budget: float) -> dict:
    print("\n== per-kernel CUDA time, B=65536 D=512 bf16, one fwd+bwd ==")
    from torch.profiler import ProfilerActivity, profile

    out = {}
    b, d, dtype = (65536, 512, torch.bfloat16) if not DRY else (40, 33, torch.float32)
    for kind in ("siglip", "clip"):
        if left(budget) < 0:
            break
        x, y = features(b, d, dtype, grad=True)
        s = torch.tensor(30.0, device=DEV, requires_grad=True)
        bias = torch.tensor(-10.0, device=DEV, requires_grad=True)
        fn = loss_fn(kind)
        run_once(kind, x, y, s, bias, fn, True)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
            run_once(kind, x, y, s, bias, fn, True)
            sync()
        rows = []
        for e in prof.key_averages():
            us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) if not DRY else e.cpu_time_total
            if us > 0:
                rows.append((e.key, e.count, us / 1e3))
        rows.sort(key=lambda r: -r[2])
        print(f"-- {kind}")
        for name, count, ms in rows[:10]:
            print(f"  {ms:9.2f} ms  x{count:<5} {name[:90]}")
        out[kind] = rows[:20]
    return out


# ---- 5. config sweep -----------------------------------------------------------------------------
def sweep(budget: float, rate: float) -> list[dict]:
    print("\n== TritonConfig sweep, B=65536 D=512 bf16 fwd+bwd (ratio to floor3) ==")
    base = TritonConfig.default(torch.bfloat16)
    candidates = {
        "default": base,
        "n64": TritonConfig(block_n=64),
        "regs128": TritonConfig(max_regs=128),  # 2 CTAs/SM for the tile kernels (small spills)
        "regs128_s2": TritonConfig(max_regs=128, num_stages=2),
        "k32_s4": TritonConfig(block_k=32, num_stages=4),
        "s4": TritonConfig(num_stages=4),
        "gemm_d256": TritonConfig(gemm_d=256, gemm_k=64, gemm_stages=3),
        "gemm_m256_w8": TritonConfig(gemm_m=256, gemm_d=128, gemm_k=64),
        "tile_128x256": TritonConfig(block_n=256, num_stages=3),
        "super16k": TritonConfig(super_rows=16384, super_cols=16384),
        "super4k": TritonConfig(super_rows=4096, super_cols=4096),
        "cublas_gemms": TritonConfig(grad_gemm="cublas"),
        "warps4": TritonConfig(num_warps=4, gemm_warps=4),
    }
    b, d, dtype = (65536, 512, torch.bfloat16) if not DRY else (40, 33, torch.float32)
    if DRY:
        candidates = {"interpreter": TritonConfig.interpreter()}
    floor3 = 3 * 2 * b * b * d / (rate * 1e12) * 1e3
    rows = []
    for name, cfg in candidates.items():
        for kind in ("siglip", "clip"):
            if left(budget) < 0:
                return rows
            try:
                row = timing(kind, b, d, dtype, loss_fn(kind, TritonKernels(cfg)), True, budget)
            except Exception as e:  # e.g. OutOfResources for a too-large tile: that is the result
                row = dict(loss=kind, error=f"{type(e).__name__}: {str(e)[:200]}")
            row["config"] = name
            if row.get("ms"):
                row["ratio"] = row["ms"] / floor3
                print(f"{name:14} {kind:6} {row['ms']:8.2f} ms  ratio {row['ratio']:.3f}")
            else:
                print(f"{name:14} {kind:6} {row.get('error')}")
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="GPU correctness + speed check of megabatch's triton backend")
    p.add_argument("--out", default="triton_check.json")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are skipped past it")
    p.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 1048576])
    p.add_argument("--max-1152", type=int, default=262144, help="largest B timed at D=1152")
    p.add_argument("--skip", nargs="*", default=[], choices=["correctness", "timings", "breakdown", "sweep"])
    p.add_argument("--huge", type=int, nargs="*", default=[],
                   help="time these batch sizes only (bf16, D=512, fwd+bwd, one call each, no warm-up), e.g. "
                        "--huge 4194304 --skip correctness breakdown sweep: about 5 min on an H100")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, toy sizes: tests the script")
    args = p.parse_args()
    global DEV, DRY
    if args.dry_run:
        DEV, DRY = "cpu", True
        args.sizes, args.max_1152 = [24, 40], 24
        args.huge = [48] if args.huge else []
    import triton

    env = dict(gpu=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", torch=torch.__version__,
               triton=triton.__version__,
               cuda=torch.version.cuda, date=datetime.datetime.now().isoformat(timespec="seconds"),
               command=" ".join(sys.argv))
    print(env)
    result: dict[str, Any] = dict(env=env)
    if "correctness" not in args.skip:
        result["correctness"] = correctness(args.budget * 0.25)
    torch.set_float32_matmul_precision("high")  # timings: fp32 inputs on TF32 (kernels and floor alike)
    rates = {}
    for dname in DTYPES:
        for d in (512, 1152) if not DRY else (512, 1152, 33, 17):
            rates[(dname, d)] = cublas_rate(DTYPES[dname], d) if not (DRY and dname == "bf16") else 1.0
            print(f"cuBLAS {dname} 16384x{d}x16384: {rates[(dname, d)]:.0f} TFLOP/s")
    result["cublas_tflops"] = {f"{k[0]}_D{k[1]}": v for k, v in rates.items()}
    if "timings" not in args.skip:
        result["timings"] = timings(args, rates, args.budget * 0.8)
    if "breakdown" not in args.skip:
        result["breakdown"] = breakdown(args.budget * 0.85)
    if "sweep" not in args.skip:
        result["sweep"] = sweep(args.budget, rates[("bf16", 512)])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out} after {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
