"""Contract: `megabatch bench` runs end to end on CPU — table on stdout, JSON with the environment
(versions, date, command) and one result per case, a PNG with --plot — and rejects bad flags."""
from __future__ import annotations

import json

import pytest

from megabatch.bench import peers
from megabatch.cli import main


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        ["bench", "--loss", "clip", "siglip", "--backend", "torch", "--batch", "64", "128", "--dim", "8",
         "--repeat", "1", "--peers", "--json", str(out), "--plot", str(png)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "/floor3" in text and "plain" in text
    data = json.loads(out.read_text())
    assert {"torch", "date", "command"} <= set(data["environment"])
    cases = {(r["case"]["loss"], r["case"]["method"], r["case"]["batch"]) for r in data["results"]}
    methods = ["torch", *peers.available("cpu")]  # "plain", and open_clip where it is installed
    assert cases == {(loss, m, b) for loss in ("clip", "siglip") for m in methods if loss in peers.PEERS.get(m, (loss,))
                     for b in (64, 128)}
    for r in data["results"]:
        assert r["error"] is None and r["ms"] > 0 and r["peak_mib"] >= 0 and r["floor_ratio"] > 0
    assert png.stat().st_size > 10_000


def test_peers_plain_matches_megabatch():
    import torch

    import megabatch as mb

    x, y = torch.randn(12, 5), torch.randn(12, 5)
    s, b = torch.tensor(3.0), torch.tensor(-2.0)
    assert torch.allclose(peers.get("plain", "clip")(x, y, s, b), mb.clip_loss(x, y, s), atol=1e-5)
    assert torch.allclose(peers.get("plain", "siglip")(x, y, s, b), mb.siglip_loss(x, y, s, b), atol=1e-5)
    with pytest.raises(ValueError, match="does not implement"):
        peers.get("siglip_kernel", "clip")


@pytest.mark.parametrize("argv", [["bench", "--batch", "0"], ["bench", "--loss", "triplet"], ["frobnicate"]])
def test_bad_flags_are_reported(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "megabatch" in capsys.readouterr().err


def test_slow_or_out_of_memory_methods_are_not_run_at_larger_batches():
    from megabatch.bench import Case, Result, skip_reason

    def case(b: int) -> Case:
        return Case("clip", "inf_cl", b, 512, "bfloat16", "cuda", repeat=3)

    assert skip_reason(None, case(1024), 60) is None
    fast = Result(case(1024), ms=100.0)
    assert skip_reason(fast, case(2048), 60) is None  # 0.1 s * 4 * (3 + 1) = 1.6 s
    assert skip_reason(fast, case(32768), 60) == "skipped: projected 410 s > --max-seconds 60"
    oom = Result(case(1024), error="OOM")
    assert skip_reason(oom, case(2048), 60) == "skipped: OOM at B=1024"
    chained = Result(case(2048), error="skipped: OOM at B=1024")
    assert skip_reason(chained, case(4096), 60) == "skipped: OOM at B=1024"
    failed = Result(case(1024), error="RuntimeError: boom")
    assert skip_reason(failed, case(2048), 60) is None  # a one-off failure is not extrapolated


def test_bench_lists_skipped_cases(capsys):
    rc = main(["bench", "--loss", "siglip", "--backend", "torch", "--batch", "32", "4096", "--dim", "8",
               "--repeat", "1", "--max-seconds", "0.001"])
    assert rc == 0
    assert "skipped: projected" in capsys.readouterr().out
