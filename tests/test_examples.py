"""Contract: the integration examples run (docs/integrations.md shows excerpts of them; that those
lines are in these files is checked by tests/test_docs.py).

- examples/open_clip_swap.py: the open_clip-style stand-in's forward output fed to megabatch.ClipLoss
  / SigLipLoss (keywords as open_clip's losses take them) gives open_clip's single-process losses
  (written out here: cross-entropy both ways / -sum log sigmoid(z * logits) / B) and the same
  gradient for every parameter, in float64; the example's training steps run.
- examples/hf_torchrun.py under torchrun with 2 gloo ranks prints its 3 global losses and exits 0;
  examples/hf_trainer.py (ContrastiveTrainer with GradCache) trains its 2 steps in-process.
"""
from __future__ import annotations

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
