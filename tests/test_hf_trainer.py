"""Contract: megabatch.integrations.hf.ContrastiveTrainer under torchrun trains with the exact global loss.

torchrun starts 3 CPU processes (gloo); each rank's Trainer takes 4 of 12 examples in one step, with
ids in the dataset (kept through Trainer's column removal). The gradient the optimiser sees on rank 0
(after DDP's averaging) equals Hugging Face's own ``return_loss=True`` gradient on all 12 examples,
for every parameter, and the logged training loss (Trainer's mean over ranks) is HF's loss: CLIP
through GradCache (micro_batch_size=2) and SigLIP without it. After the step, ``evaluate()`` (4 per
rank: one global batch) reports HF's loss of the trained model on all 12 as eval_loss.
gradient_accumulation_steps > 1 is refused (it would split the contrastive batch), and so is a
model without the feature methods.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the [hf] extra)")

import _hf_models as H  # noqa: E402
from test_hf import assert_grads_equal  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from megabatch.integrations import hf  # noqa: E402

RUNS = ("clip:2", "siglip:0")
HERE = Path(__file__).parent


def test_trainer_under_torchrun_matches_hf_full_batch(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(HERE / "_hf_trainer_run.py"), str(tmp_path), *RUNS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for spec in RUNS:
        kind, micro = spec.split(":")
        got = torch.load(tmp_path / f"{kind}-{micro}.pt")
        assert got["world"] == 3
        want_loss, want = H.reference(H.build(kind), H.batch(kind, 12, seed=5))
        assert got["loss"] == pytest.approx(want_loss.item(), abs=1e-4)  # Trainer logs 4 digits
        assert_grads_equal(got["grads"], want)
        assert got["eval_loss"] == pytest.approx(got["hf_eval_loss"], rel=1e-9)


def test_trainer_refuses_what_would_change_the_loss(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        hf.ContrastiveTrainer(model=H.build("clip"), args=args)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="Linear has no get_image_features"):
        hf.ContrastiveTrainer(model=torch.nn.Linear(2, 2), args=args)
