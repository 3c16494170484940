"""Contract: `megabatch bench` under torchrun (the distributed mode) runs every strategy on every rank
and reports, per rank, a time, a peak memory and the bytes sent, which equal the communication
volume the strategies document (ring cost model, strategies/_comm.py): checked exactly here for
W = 2 with the 'dense' backend (column statistics in float64), plus the 12-int64 metadata exchange."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

W, B_LOCAL, D = 2, 16, 8


def expected_bytes(loss: str, strategy: str) -> int:
    """Bytes one rank sends for forward+backward with equal local batches, float32 everywhere."""
    e = f = 4
    st = 8  # column statistics travel as float64 log-sum-exps
    b, total = B_LOCAL, W * B_LOCAL
    meta = (W - 1) * 14 * 8  # the layout exchange: 14 int64 to each peer
    all_reduce = lambda n: 2 * (W - 1) / W * n  # noqa: E731
    if strategy == "gather":
        sent = (W - 1) * b * D * e + all_reduce(total * D * f)  # gather y; reduce the text gradients
        if loss == "clip":  # column log-sum-exp (max, then sum); backward gathers them with the block
            sent += 2 * all_reduce(total * st) + (W - 1) * b * st
    elif loss == "clip":  # ring: forward blocks + column stats, backward blocks + stats + gradients
        sent = (W - 1) * b * D * e + W * b * st + (W - 1) * b * (D * e + st) + W * b * D * f
    else:
        sent = (W - 1) * b * D * e + W * b * D * f
    return int(sent) + meta


@pytest.mark.timeout(120)
def test_bench_under_torchrun_reports_per_rank_and_exact_bytes(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W),
           "-m", "megabatch.bench", "--strategy", "ring", "gather", "--loss", "clip", "siglip",
           "--backend", "dense", "--batch", str(B_LOCAL), "--dim", str(D), "--repeat", "1", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sent MiB" in proc.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["world"] == str(W) and data["environment"]["backend"] == "gloo"
    rows = data["results"]
    assert len(rows) == 2 * 2 * W
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["peak_mib"] >= 0
        assert r["world"] == W and r["batch"] == B_LOCAL
        want = expected_bytes(r["loss"], r["strategy"])
        assert round(r["sent_mib"] * 2**20) == want, (r["loss"], r["strategy"], r["sent_mib"] * 2**20, want)
    assert sorted(r["rank"] for r in rows) == sorted(list(range(W)) * 4)
