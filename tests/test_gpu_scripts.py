"""Contract: the GPU tooling works before any GPU session needs it.

- benchmarks/triton_aot_check.py compiles every Triton kernel for an H100 (sm_90) on this CPU-only
  machine: a kernel edit that Triton's interpreter accepts but the real compiler rejects (layouts,
  shared memory, dtypes) fails here, not in a scarce GPU session; the main kernels at D = 512 stay
  software-pipelined, on wgmma, without register spills.
- benchmarks/gpu_triton_check.py --dry-run runs every section (correctness, cuBLAS rate, timings,
  the B = 4M path, profile, sweep) on CPU through the interpreter, and its correctness section
  passes.
Both run as subprocesses without TRITON_INTERPRET for the compile (the AOT check needs real
@triton.jit functions) and with it for the dry run (the script sets it itself).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: no kernels to compile")

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kernels_compile_for_sm90():
    out = _run(["benchmarks/triton_aot_check.py", "--dim", "512", "129", "--dtype", "bf16", "fp32"], timeout=600)
    assert "COMPILE FAILED" not in out, out
    rows = re.findall(r"^  (\w+)\s+regs\s+(\d+)\s+spill\s+(\d+) B\s+smem\s+(\d+) KiB\s+pipelined (yes|NO )\s+wgmma (yes|no)",
                      out, re.M)
    assert len(rows) == 16, out  # 4 kernels x 2 dims x 2 dtypes
    # bf16 at D = 512 (the first four rows): the configuration the targets are about.
    for name, regs, spill, smem, pipelined, wgmma in rows[:4]:
        assert pipelined == "yes" and wgmma == "yes" and int(spill) == 0, (name, regs, spill, pipelined, wgmma)
        assert int(smem) <= 227, (name, smem)  # an H100 SM has 227 KiB of shared memory per block


def test_gpu_check_dry_run(tmp_path):
    out_json = tmp_path / "check.json"
    _run(["benchmarks/gpu_triton_check.py", "--dry-run", "--out", str(out_json)], timeout=600)
    data = json.loads(out_json.read_text())
    assert {"env", "correctness", "cublas_tflops", "timings", "breakdown", "sweep"} <= set(data)
    assert data["correctness"] and all(r["ok"] for r in data["correctness"]), [
        r for r in data["correctness"] if not r["ok"]]
    assert all(r.get("ms") for r in data["timings"]) and data["sweep"]
    huge = tmp_path / "huge.json"
    _run(["benchmarks/gpu_triton_check.py", "--dry-run", "--huge", "4194304", "--skip", "correctness", "breakdown",
          "sweep", "--out", str(huge)], timeout=600)
    assert json.loads(huge.read_text())["timings"]
