"""Contract: MegabatchLoss under SentenceTransformerTrainer and torchrun (3 gloo ranks) is ST's own loss.

One torchrun launch trains five trainers in turn on the same float64 tiny model and data
(tests/_st_trainer_run.py): MNRL and CachedMNRL (symmetric, per_direction, mini-batch 3), both with
gather_across_devices=True, against MegabatchLoss with the same settings: the logged loss and every
gradient the optimiser sees (after DDP) agree. A learnable SigLIP scale and bias, started from a
different value on each rank, end equal on every rank, get no weight decay, and their gradient (and
the model's) is the one-process gradient of the whole global batch. Without the trainer, uneven
batches (3, 5, 7 rows) with two positive columns, repeated anchors (positives="anchor"), a learnable
CLIP scale and GradCache give the one-process loss and gradients of the 15 rows (ring, gather, and
hierarchical as 3 nodes of 1 rank given by ranks_per_node=1 alone: LOCAL_WORLD_SIZE is removed first).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the [st] extra (sentence-transformers) is not installed")
pytest.importorskip("datasets", reason="SentenceTransformerTrainer needs datasets (the [st] extra)")

import _st_models  # noqa: E402
from _st_trainer_run import N, UNEVEN, data, uneven_rows  # noqa: E402

from megabatch.integrations.sentence_transformers import MegabatchLoss  # noqa: E402

HERE = Path(__file__).parent
RUNS = ("mnrl", "ours", "cached", "ours_cached", "siglip", "uneven_ring", "uneven_gather", "uneven_hierarchical")
WORLD = 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("st_trainer")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(HERE / "_st_trainer_run.py"), str(out), *RUNS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {(run, r): torch.load(path, weights_only=False) for run in RUNS for r in range(WORLD)
            if (path := out / f"{run}-{r}.pt").exists()}


def model_grads(grads: dict) -> dict:
    return {k: v for k, v in grads.items() if k.startswith("0.")}


@pytest.mark.parametrize("theirs, ours", [("mnrl", "ours"), ("cached", "ours_cached")])
def test_equals_st_loss_under_ddp(results, theirs, ours):
    want, got = results[(theirs, 0)], results[(ours, 0)]
    assert got["world"] == WORLD
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    w, g = model_grads(want["grads"][0]), model_grads(got["grads"][0])
    assert w.keys() == g.keys() and len(w) > 30
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-9, atol=1e-12, msg=name)


def test_learnable_scale_and_bias_on_ranks(results, tmp_path):
    scalars = [results[("siglip", r)]["scalars"] for r in range(WORLD)]
    for r in range(1, WORLD):  # two SGD steps later, still equal (bit for bit)
        assert all(torch.equal(a, b) for a, b in zip(scalars[0], scalars[r]))
    assert all(results[("siglip", r)]["decay"] == [0.0, 0.0] for r in range(WORLD))
    # the first step's gradients are those of the whole global batch in one process, from rank 0's start
    model = _st_models.build(str(tmp_path / "m")).double()
    loss = MegabatchLoss(model, loss="siglip", scale=10.0, bias=-5.0, learnable=True)
    rows = data()[:N]
    features = [model.preprocess(rows[c]) for c in ("anchor", "positive", "negative")]
    loss([dict(f) for f in features]).backward()
    want = {f"0.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    want |= {f"1.norm.{n}": p.grad for n, p in loss.norm.named_parameters()}
    got = results[("siglip", 0)]["grads"][0]
    got = {k: v for k, v in got.items() if k.startswith("0.") or k.startswith("1.norm.")}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture(scope="module")
def uneven_want(tmp_path_factory):
    """The one-process loss and gradients of the uneven runs' 15 rows (one computation for every strategy)."""
    model = _st_models.build(str(tmp_path_factory.mktemp("uneven") / "m")).double()
    columns = uneven_rows(WORLD)
    loss_fn = MegabatchLoss(model, **UNEVEN)
    loss = loss_fn([model.preprocess(c) for c in columns])
    ids = loss_fn._ids([model.preprocess(c) for c in columns])
    assert ids["image_ids"].unique().numel() == 4  # the repeated anchors share their id
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want["norm.logit_scale"] = loss_fn.norm.logit_scale.grad  # CLIP's: each rank's share differs, the mean is exact
    return loss.detach(), want


@pytest.mark.parametrize("strategy", ["ring", "gather", "hierarchical"])
def test_uneven_batches_lists_of_positives_and_duplicates(results, uneven_want, strategy):
    got = results[(f"uneven_{strategy}", 0)]
    loss, want = uneven_want
    torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-12)
    assert got["grads"].keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got["grads"][name], want[name], rtol=1e-9, atol=1e-12, msg=name)
