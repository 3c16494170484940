"""benchmarks/st_side_by_side.py --part alone / predict: the loss-alone rows the docs quote.

Two gloo ranks on a tiny batch: megabatch and CachedMNRL's loss stage give the same global loss,
each with a per-rank peak and a time, and MNRL is skipped with its predicted need when the memory
it must leave free is more than the host has; the predicted rows equal `megabatch plan`'s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers", reason="the [st] extra (sentence-transformers) is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "st_side_by_side.py")


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run cmd in its own process group; the group is killed if it outlives timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail(f"{cmd[:6]} did not finish within {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.timeout(200)
def test_alone_two_ranks_agree_and_mnrl_skips_with_its_need(tmp_path: Path) -> None:
    out = tmp_path / "alone.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--part", "alone", "--alone", "40", "--mini", "16", "--keep-free", "1e9", "--json", str(out)]
    proc = run(cmd, 180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2 and data["global_batch"] == 80 and data["dim"] == 384
    env = data["environment"]
    assert env["sentence_transformers"] and env["torch"] and env["date"] and "--part alone" in env["command"]
    ours, cached = data["losses"]["megabatch"], data["losses"]["cached_mnrl"]
    for row in (ours, cached):
        assert len(row["peak_rise_mib_per_rank"]) == 2 and row["median_s"] > 0
    assert abs(ours["global_loss"] - cached["global_loss"]) < 1e-4 * abs(ours["global_loss"])
    skipped = data["losses"]["mnrl"]["not_run"]
    assert skipped.startswith("needs ") and "2 ranks x" in skipped and "megabatch plan --world 2 --batch 80" in skipped
    assert "mnrl: needs" in proc.stdout


def load_script():
    """The script as a module (it imports sentence-transformers only where a part needs it)."""
    spec = importlib.util.spec_from_file_location("st_side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_rows_are_megabatch_plan(tmp_path: Path, monkeypatch, capsys) -> None:
    from megabatch.plan import plan

    script = load_script()
    out = tmp_path / "pred.json"
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--part", "predict", "--predict-batch", "262144", "--predict-world", "8",
                                      "--json", str(out)])
    script.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "predicted" and row["world"] == 8 and row["global_batch"] == 262144
    assert row["megabatch_ring_tiled_peak_bytes"] == plan("clip", "ring", "torch", 8, 262144, 384, "float32",
                                                          device="cpu").peak_bytes
    dense = plan("clip", "gather", "dense", 8, 262144, 384, "float32", device="cpu").peak_bytes
    assert row["mnrl_gather_dense_peak_bytes"] == dense >= 4 * (262144 // 8) * 262144 * 4  # 4 b x B float32
    assert "B=262144 W=8 (predicted)" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--part", "predict", "--predict-world", "0"])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    assert exit_.value.code == 2 and "--predict-world must be positive integers" in capsys.readouterr().err
