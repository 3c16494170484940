"""Peak live memory of one loss forward and backward, counted from the torch allocator's own events, on CPU.

    python benchmarks/memory_accounting.py [--batch 256 512 1024] [--dim 256] [--dtype float16]

The torch profiler (profile_memory=True) records every allocation and free of the CPU allocator;
their running sum, in time order, is the live memory. Unlike peak RSS it ignores the Python and
numpy memory around the call, so it also measures the `triton` backend through Triton's
interpreter (which the script turns on), on the same code path the GPU runs, at sizes the
interpreter runs in seconds. Reported per phase, with its slope in bytes per b*D between batch
sizes (buffers whose size does not grow with b drop out of the slope):
  forward:  peak beyond the inputs while the loss is computed;
  backward: peak beyond what was live when backward started (the saved tensors).
The accounting of benchmarks/triton_notes.md ("Memory") for 16-bit features: CLIP forward O(b),
backward 8 (dx 2, fp32 gy 4, dy 2); SigLIP forward 8 (the same three, computed in the forward),
backward 4 (dx*g and dy*g next to the 4 saved). Either way the peak is 8 b*D: 4 GiB at B = 1M,
D = 512. Why per phase: Triton's interpreter keeps some tensors of its launches alive after the
call returns (no Python object of ours holds them; on the GPU they are freed), so a buffer of the
forward can still be live during the backward; within a phase that only adds constants.
The O(b * D) helpers' row chunk (_numerics.py ROW_CHUNK, 32768 rows) is set to 64 here so
that, as at B = 1M, it is a small part of b. Each case runs in a fresh process. The GPU's own
number is max_memory_allocated in gpu_check.py (its peers and scale sections).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's kernels are imported

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch.kernels import TorchChunkedKernels  # noqa: E402
import megabatch as mb  # noqa: E402
from megabatch import _numerics  # noqa: E402
from megabatch.bench.allocator import peak_live_bytes  # noqa: E402



def config():
    """Interpreter-sized tiles; super-blocks of 128 x 128 pairs."""
    from megabatch.kernels.triton_kernels import TritonConfig

    return TritonConfig(64, 64, 64, 64, 64, 64, 128, 128, num_warps=4, num_stages=1, gemm_warps=4, gemm_stages=1,
                        merge_block=128)


def _case(kind: str, backend: str, b: int, dim: int, dtype_name: str, queue) -> None:
    from megabatch.kernels.triton_kernels import TritonKernels

    torch.set_num_threads(1)
    _numerics.ROW_CHUNK = 64
    dtype = getattr(torch, dtype_name)
    kernels = TritonKernels(config()) if backend == "triton" else TorchChunkedKernels()
    g = torch.Generator().manual_seed(b)
    x = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).to(dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    beta = torch.tensor(-5.0, requires_grad=True)
    out = {}

    def forward() -> None:
        out["loss"] = (mb.clip_loss(x, y, s, backend=kernels, strategy="local") if kind == "clip"
                       else mb.siglip_loss(x, y, s, beta, backend=kernels, strategy="local"))

    fwd = peak_live_bytes(forward)
    bwd = peak_live_bytes(lambda: out["loss"].backward())
    queue.put((fwd, bwd))


def measure(kind: str, backend: str, b: int, dim: int, dtype_name: str) -> tuple[int, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(kind, backend, b, dim, dtype_name, queue))
    proc.start()
    try:
        return queue.get(timeout=900)
    finally:
        proc.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = p.parse_args()
    cfg = config()
    print(f"torch {torch.__version__}, dtype {args.dtype}, D = {args.dim}, triton super-blocks "
          f"{cfg.super_rows} x {cfg.super_cols}; peak live MiB per phase, and its slope in bytes per b*D")
    print(f"{'loss':7}{'backend':9}{'phase':10}" + "".join(f"{'b=' + str(b):>10}" for b in args.batch) + "   slope")
    for kind in ("clip", "siglip"):
        for backend in ("triton", "torch"):
            peaks = [measure(kind, backend, b, args.dim, args.dtype) for b in args.batch]
            for phase in (0, 1):
                ps = [p[phase] for p in peaks]
                slopes = [(p1 - p0) / ((b1 - b0) * args.dim)
                          for (b0, p0), (b1, p1) in zip(zip(args.batch, ps), zip(args.batch[1:], ps[1:]))]
                print(f"{kind:7}{backend:9}{('forward', 'backward')[phase]:10}"
                      + "".join(f"{p / 2**20:>10.2f}" for p in ps) + "   " + ", ".join(f"{v:.2f}" for v in slopes),
                      flush=True)


if __name__ == "__main__":
    main()
