"""Contract: `megabatch bench` runs end to end on CPU — table on stdout, JSON with the environment
(versions, date, command) and one result per case, a PNG with --plot — and rejects bad flags."""
from __future__ import annotations

import json

import pytest

from megabatch import peers
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
