"""`megabatch study --quick`: the batch-size study end to end on the real emoji set with locked
MiniLM (the full one is `make study`).

Contracts: it is a `megabatch` subcommand; it writes study.json (environment with command, date
and machine; one row per (loss, batch, seed) with held-out image->text R@1 and its chance, the
final t and b, samples seen equal across batch sizes, caption positives, the image tower (the quick
study's is the ViT), seconds) and study.png;
the tiled loss's runs match the dense loss's runs (same loss curve, same retrieval); the loss
memory rows show the dense loss holding a B x B matrix and the tiled one less; bad arguments are
usage errors (exit 2).
"""
from __future__ import annotations

import json

import pytest

from megabatch.cli import main

from test_train_realdata import needs_emoji, needs_minilm


def test_is_a_subcommand(capsys):
    """`megabatch study` reaches the app's study through the entry-point group the app registers."""
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: megabatch study")


@pytest.mark.parametrize("argv", [["--batches", "1"], ["--samples", "8", "--batches", "16"], ["--lr", "0"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", *argv])
    assert e.value.code == 2 and "error" in capsys.readouterr().err


@needs_emoji
@needs_minilm
def test_quick_study(tmp_path, monkeypatch, emoji_cache):
    monkeypatch.setenv("MEGABATCH_CACHE", str(emoji_cache))
    out = tmp_path / "study"
    assert main(["study", "--quick", "--memory-batches", "256", "2048", "--output", str(out)]) == 0
    result = json.loads((out / "study.json").read_text())
    assert (out / "study.png").stat().st_size > 10_000
    env = result["environment"]
    assert env["command"].startswith("megabatch study --quick") and env["date"] and env["machine"]
    rows = [r for r in result["rows"] if r["backend"] == "auto"]
    assert {(r["loss"], r["batch"]) for r in rows} == {(loss, b) for loss in ("clip", "siglip") for b in (16, 64)}
    assert {r["samples"] for r in rows} == {512} and {r["positives"] for r in rows} == {"caption"}
    assert {r["image_tower"] for r in result["rows"]} == {result["plan"]["image_tower"]} == {"vit"}
    for r in rows:
        assert 0 <= r["i2t_r1"] <= 1 and r["chance_i2t_r1"] < 0.001 and r["seconds"] > 0
        assert (r["logit_bias"] is None) == (r["loss"] == "clip")
    for loss in ("clip", "siglip"):
        tiled = next(r for r in rows if r["loss"] == loss and r["batch"] == 64)
        dense = next(r for r in result["rows"] if r["loss"] == loss and r["backend"] == "dense")
        assert [s for s, _ in tiled["loss_curve"]] == [s for s, _ in dense["loss_curve"]]
        for (_, a), (_, b) in zip(tiled["loss_curve"], dense["loss_curve"]):
            assert a == pytest.approx(b, rel=1e-4)
        assert tiled["i2t_r1"] == pytest.approx(dense["i2t_r1"], abs=2 / 1829)
    mem = {(m["loss"], m["backend"], m["batch"]): m["peak_mib"] for m in result["memory"]}
    for loss in ("clip", "siglip"):
        assert mem[(loss, "dense", 2048)] >= 2048 * 2048 * 4 / 2**20  # at least one B x B fp32 matrix
        assert mem[(loss, "torch", 2048)] < mem[(loss, "dense", 2048)] / 2
