"""Contract: the GPU tooling works before any GPU session needs it.

- benchmarks/triton_aot_check.py compiles every Triton kernel for an H100 (sm_90) on this CPU-only
  machine: a kernel edit that Triton's interpreter accepts but the real compiler rejects (layouts,
  shared memory, dtypes) fails here, not in a scarce GPU session; the main kernels at D = 512 stay
  software-pipelined, on wgmma, without register spills.
- benchmarks/gpu_check.py --dry-run runs every section (correctness, floor, peers, scale, sweep) on
  CPU through the interpreter: its correctness section passes; every section leaves its rows in
  the JSON; the peers run in worker processes and a stalled one is killed at its time limit; at
  most 8 files land in --out; it prints the planned seconds and ends with `planned: N s`, N <= 480.
  `--only` runs one section (with the floor its ratios need) and bad arguments are usage errors.
- A correctness FAIL skips the timing sections and exits 1.
- The ids correctness cases (which run once the engine takes image_ids=) work: against a stand-in
  engine that computes the issue's definitions they pass, and against one that ignores the ids
  they FAIL.
The scripts run as subprocesses without TRITON_INTERPRET for the compile (the AOT check needs real
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
import torch

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


GPU_CHECK_FILES = ["gpu_check.json", "gpu_check.log", "gpu_check_peers.png"]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    stdout = _run(["benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--wheels", str(tmp_path / "none")],
                  timeout=600)
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"planned: (\d+) s", last)
    assert m and 0 < int(m[1]) <= 480, last
    plan_line = next(line for line in stdout.splitlines() if line.startswith("plan (H200 seconds"))
    for section in ("setup", "correctness", "floor", "peers", "scale", "sweep"):
        assert re.search(rf"\b{section} \d+", plan_line), plan_line
    assert sorted(os.listdir(out)) == GPU_CHECK_FILES  # JSON, log, PNG: well under the 8 files $OUT returns
    assert (out / "gpu_check.log").read_text().strip().endswith(last)
    data = json.loads((out / "gpu_check.json").read_text())
    assert sum(data["plan_s"].values()) <= 480 and data["used_s"]["total"] < 480
    sec = data["sections"]
    assert list(sec) == ["correctness", "floor", "peers", "scale", "sweep"]
    corr = sec["correctness"]
    assert corr["rows"] and corr["failed"] == 0 and all(r["ok"] for r in corr["rows"]), corr
    assert corr["ids"] == "ran"  # the engine takes image_ids= now: the ids cases must run
    assert sec["floor"]["floor_tflops"] > 0 and sec["floor"]["mm_out_dtype"].split()[0] in ("yes", "no")
    rows = {(r["case"]["method"], r["case"]["loss"], r["case"]["batch"]): r for r in sec["peers"]["rows"]}
    for method in ("triton", "plain"):
        for loss in ("clip", "siglip"):
            for batch in (24, 48):
                r = rows[(method, loss, batch)]
                assert r["ms"] > 0 and r["floor_ratio"] > 0 and r["peak_mib"] is not None, r
    assert rows[("stall", "clip", 24)]["error"].startswith("timeout: killed after"), rows[("stall", "clip", 24)]
    assert all(rows[("stall", loss, b)]["error"].startswith("skipped") for loss, b in
               (("siglip", 24), ("clip", 48), ("siglip", 48)))
    assert [r["source"] for r in sec["scale"]["memory"]] == ["peers section"] * 2
    assert sec["scale"]["huge"]["ms"] > 0 and sec["scale"]["huge"]["B"] == 96
    assert {(r["config"], r["loss"]) for r in sec["sweep"]["rows"] if r.get("ms")} == {
        (c, k) for c in ("interpreter", "interp_n64") for k in ("siglip", "clip")}
    assert set(sec["sweep"]["profile"]) == {"siglip", "clip"} and all(sec["sweep"]["profile"].values())


def test_gpu_check_only_one_section(tmp_path):
    stdout = _run(["benchmarks/gpu_check.py", "--dry-run", "--only", "scale", "--out", str(tmp_path)], timeout=300)
    assert stdout.strip().splitlines()[-1].startswith("planned: ")
    assert sorted(os.listdir(tmp_path)) == ["gpu_check_scale.json", "gpu_check_scale.log"]
    data = json.loads((tmp_path / "gpu_check_scale.json").read_text())
    assert list(data["sections"]) == ["floor", "scale"]  # the floor: for the ratios
    assert [r["source"] for r in data["sections"]["scale"]["memory"]] == ["measured here (one call)"] * 2
    assert all(r["ms"] > 0 for r in data["sections"]["scale"]["memory"])


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    import gpu_check_correctness

    return gpu_check, gpu_check_correctness


@pytest.mark.parametrize("argv, message", [
    (["--dry-run"], "--out DIR is required"),
    (["--dry-run", "--out", "x", "--budget", "0"], "--budget must be positive"),
    (["--dry-run", "--out", "x", "--only", "timings"], "invalid choice"),
    (["--out", "x"], "no CUDA device here"),
])
def test_gpu_check_usage_errors(bench_modules, monkeypatch, capsys, argv, message):
    gpu_check, _ = bench_modules
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _stand_in_engine(monkeypatch, c, ignore_ids: bool = False) -> None:
    """megabatch's four entry points with the engine issue's keywords, computed densely (float32 for the
    'backends', float64 for the references) from the correctness module's own plain loss."""
    import megabatch as mb

    def pos_of(x, y, image_ids, text_ids):
        if image_ids is None or ignore_ids:
            return None
        return image_ids[:, None] == text_ids[None, :]

    def clip(x, y, s, *, image_ids=None, text_ids=None, directions="both", backend="auto", strategy="auto"):
        return c.plain("clip", x.float(), y.float(), s.float(), None, pos_of(x, y, image_ids, text_ids), directions)

    def siglip(x, y, s, b, *, image_ids=None, text_ids=None, backend="auto", strategy="auto"):
        return c.plain("siglip", x.float(), y.float(), s.float(), b.float(), pos_of(x, y, image_ids, text_ids))

    def clip_ref(x, y, s, *, image_ids=None, text_ids=None, directions="both"):
        pos = None if image_ids is None else image_ids[:, None] == text_ids[None, :]
        return c.plain("clip", x.double(), y.double(), torch.as_tensor(s).double(), None, pos, directions)

    def siglip_ref(x, y, s, b, *, image_ids=None, text_ids=None):
        pos = None if image_ids is None else image_ids[:, None] == text_ids[None, :]
        return c.plain("siglip", x.double(), y.double(), torch.as_tensor(s).double(), torch.as_tensor(b).double(), pos)

    for name, fn in (("clip_loss", clip), ("siglip_loss", siglip), ("clip_loss_reference", clip_ref),
                     ("siglip_loss_reference", siglip_ref)):
        monkeypatch.setattr(mb, name, fn)


def test_ids_cases_pass_against_the_definitions(bench_modules, monkeypatch):
    _, c = bench_modules
    _stand_in_engine(monkeypatch, c)
    assert c.ids_available()
    rows = []
    for case in c.ids_cases(True, "fp32") + c.ids_cases(True, "fp16"):
        rows += c.one_ids_case(*case, "cpu", 30.0, -10.0)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    seen = {(r["loss"], r["ids"], r["directions"]) for r in rows}
    assert seen == {("clip", "ids", "both"), ("clip", "ids", "image_to_text"), ("clip", "ids", "text_to_image"),
                    ("clip", "rect", "both"), ("siglip", "ids", "both"), ("siglip", "rect", "both")}
    assert all(r["N"] > r["B"] for r in rows)
    assert {r["quantity"] for r in rows if r["loss"] == "siglip"} == {"loss", "d_image", "d_text", "d_scale", "d_bias"}
    assert "d_bias" not in {r["quantity"] for r in rows if r["loss"] == "clip"}


def test_ids_cases_fail_an_engine_that_ignores_ids(bench_modules, monkeypatch):
    _, c = bench_modules
    _stand_in_engine(monkeypatch, c, ignore_ids=True)
    for case in [("clip", "fp32", 20, 28, 17, "ids", "both"), ("siglip", "fp32", 20, 28, 17, "ids", "both")]:
        rows = c.one_ids_case(*case, "cpu", 30.0, -10.0)
        assert not all(r["ok"] for r in rows), rows


def test_a_correctness_fail_stops_the_timing_sections(bench_modules, monkeypatch, tmp_path):
    gpu_check, c = bench_modules
    monkeypatch.setattr(c, "run", lambda *a, **k: dict(rows=[dict(ok=False)], ids="ran", failed=1, stopped=None))
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "100000", "--wheels", str(tmp_path / "none")])
    assert rc == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["sections"]["correctness"]["failed"] == 1
    for name in ("floor", "peers", "scale", "sweep"):
        assert data["sections"][name]["skipped"].startswith("correctness FAILED"), data["sections"][name]
