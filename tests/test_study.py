"""`megabatch study --quick`: the batch-size study end to end on the real emoji set with locked
MiniLM (the full one is `make study`).

Contracts: it is a `megabatch` subcommand; it writes study.json (environment with command, date
and machine; one row per (loss, batch, seed) with held-out image->text R@1 and its chance, the
final t and b, samples seen equal across batch sizes, caption positives, the image tower (the quick
study's is the ViT), seconds) and study.png;
the tiled loss's runs match the dense loss's runs (same loss curve, same retrieval); the loss
memory rows show the dense loss holding a B x B matrix and the tiled one less; bad arguments are
usage errors (exit 2).

`megabatch study --data wordnet --quick` (wordnet_study.py): rows for both losses in both regimes
(fixed steps, fixed samples) with held-out R@1 in [0, 1], the zero-shot baseline, the JSON fields,
the plot, and the embedding cache (written on the first run, read on the second, the same numbers).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megabatch.cli import main

from test_train_realdata import needs_emoji, needs_minilm

from megabatch_train.data import wordnet

needs_wordnet = pytest.mark.skipif(not (wordnet.DEFAULT_ROOT / "data.noun").exists(),
                                   reason=f"WordNet 3.0 missing: {wordnet.INSTALL}")


def test_is_a_subcommand(capsys):
    """`megabatch study` reaches the app's study through the entry-point group the app registers."""
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: megabatch study")


@pytest.mark.parametrize("argv", [["--batches", "1"], ["--samples", "8", "--batches", "16"], ["--lr", "0"],
                                  ["--data", "text"], ["--data", "wordnet", "--batches", "1"],
                                  ["--data", "wordnet", "--steps", "0"], ["--data=wordnet", "--samples", "8"],
                                  ["--data", "wordnet", "--seeds", "-1"]])
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


@needs_wordnet
@needs_minilm
def test_wordnet_quick_study(tmp_path):
    out, cache = tmp_path / "study", tmp_path / "cache"
    emoji = str(Path(__file__).resolve().parents[1] / "benchmarks" / "study" / "study.json")
    assert main(["study", "--data", "wordnet", "--quick", "--cache", str(cache), "--output", str(out),
                 "--emoji-study", emoji]) == 0
    result = json.loads((out / "study.json").read_text())
    assert (out / "study.png").stat().st_size > 10_000 and "partial" not in result
    assert result["environment"]["command"].startswith("megabatch study --data wordnet --quick")
    assert result["data"]["train"] == 300 and result["data"]["heldout"] == 100 and not result["data"]["cache_hit"]
    assert [p.name for p in cache.iterdir()] == [Path(result["data"]["cache"]).name]
    assert 0 < result["zero_shot"]["d2n_r1"] <= 1 and result["zero_shot"]["chance_d2n_r1"] < 0.02
    assert result["paper"].startswith("Zhai et al. 2023") and result["emoji_study"]["points"]
    plan = result["plan"]
    summary = {(s["regime"], s["loss"], s["batch"]): s for s in result["summary"]}
    assert set(summary) == {(g, loss, b) for g in ("steps", "samples") for loss in ("clip", "siglip")
                            for b in plan["batches"]}
    for (regime, _, batch), s in summary.items():
        assert (s["steps"] if regime == "steps" else s["samples"]) == plan[regime]
        assert s["steps"] * batch == s["samples"] and s["seeds"] == 1
    for r in result["rows"]:
        assert all(0 <= r[k] <= 1 for k in ("d2n_r1", "d2n_r5", "n2d_r1", "init_d2n_r1")) and r["finite"]
        assert r["d2n_r5"] >= r["d2n_r1"] and (r["logit_bias"] is None) == (r["loss"] == "clip")
    # The second run reads the cache: the same embeddings, so the same zero-shot retrieval and the same first run.
    again = tmp_path / "again"
    assert main(["study", "--data", "wordnet", "--quick", "--cache", str(cache), "--output", str(again),
                 "--losses", "clip", "--batches", "16", "--steps", "8", "--samples", "16"]) == 0
    second = json.loads((again / "study.json").read_text())
    assert second["data"]["cache_hit"] and second["zero_shot"] == result["zero_shot"]
    first = next(r for r in result["rows"] if (r["loss"], r["batch"], r["steps"]) == ("clip", 16, 8))
    repeat = next(r for r in second["rows"] if r["steps"] == 8)
    assert repeat["d2n_r1"] == first["d2n_r1"] and repeat["loss_curve"] == first["loss_curve"]
