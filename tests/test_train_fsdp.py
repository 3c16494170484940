"""`megabatch train --fsdp` (FSDP2, gloo on CPU): with 2 ranks it trains exactly as one process does
(same global batch and seed: the logged loss, logit scale and SigLIP bias agree to float rounding),
and its checkpoints keep the single-process format -- the model
and optimizer state written under FSDP equal the single-process run's at the same step, a
single-process checkpoint resumes under --fsdp, an --fsdp checkpoint resumes in one process, and
a checkpoint of a model with 0-dim logit_scale / logit_bias (this app's before they became shape
(1,)) still resumes; each resumed run continues the same curve. Sharding a user model turns its 0-dim
parameters into shape (1,) ones (fully_shard refuses 0-dim ones). --fsdp in one process is a usage
error (exit 2, the message, no traceback).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_utils import run_world
from megabatch_train import from_preset, train
from megabatch_train.cli import main

STEPS = 4
# A fixed bias start: the balanced default gives the bias a near-zero first gradient, whose Adam step
# (g / |g|) rounding can flip. No centring: its running means are per rank (eval only) under FSDP.
FLAGS = dict(loss="siglip", center=False, logit_bias_init=-10.0, steps=STEPS, log_every=1, ckpt_every=1,
             keep_checkpoints=STEPS, progress=False)


def curve(run: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["logit_scale"], r["logit_bias"]) for r in rows]


def same_curve(got: list, want: list) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=1e-4), (g, w)


def ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:06d}.pt", weights_only=True)


def close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    """Equal shapes and values to float32 rounding through a few steps (relative to the tensor's norm:
    AdamW's moments hold gradients, whose small entries carry the run's rounding). The attention's
    key bias is left out: its gradient is zero in exact arithmetic (softmax ignores a shift shared
    by a row's logits), so Adam's g / sqrt(v) turns pure rounding into lr-sized steps."""
    assert got.shape == want.shape, what
    if isinstance(what, str) and what.endswith("qkv.bias"):
        q, _, v = got.chunk(3)
        got, want = torch.cat([q, v]), torch.cat([want.chunk(3)[0], want.chunk(3)[2]])
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    assert err < 1e-4, (what, err)


def same_state(got: dict, want: dict) -> None:
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        close(got["model"][k], v, k)
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for i, state in want["optimizer"]["state"].items():
        assert got["optimizer"]["state"][i].keys() == state.keys()
        for k, v in state.items():
            close(got["optimizer"]["state"][i][k], v, (i, k))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(from_preset("tiny", output=str(out), **FLAGS))
    return out


def test_fsdp_two_ranks_match_one_and_save_its_format(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megabatch_train", "--fsdp", "--preset", "tiny", "--loss", "siglip", "--no-center",
           "--logit-bias-init", "-10",
           "--steps", str(STEPS), "--log-every", "1", "--ckpt-every", "1", "--keep-checkpoints", str(STEPS),
           "--output", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) x 32" in proc.stdout
    same_curve(curve(out), curve(single))
    assert ckpt(out, STEPS)["model"]["logit_scale"].shape == (1,)
    same_state(ckpt(out, STEPS), ckpt(single, STEPS))
    # An --fsdp checkpoint resumes in one process and continues the same curve.
    plain = tmp_path / "plain"
    train(from_preset("tiny", output=str(plain), resume=str(out / "checkpoints" / "step_000002.pt"), **FLAGS))
    same_curve(curve(plain), curve(single)[2:])
    same_state(ckpt(plain, STEPS), ckpt(single, STEPS))


class ZeroDim(torch.nn.Module):
    """A user model as the app accepts it, with open_clip's / HF's 0-dim logit_scale."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Identity()])
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x) * self.logit_scale

    encode_text = encode_image


def resume_sharded(rank: int, world: int, checkpoint: str, output: str) -> dict:
    train(from_preset("tiny", output=output, resume=checkpoint, fsdp=True, **FLAGS))
    # and: fsdp.shard turns a user model's 0-dim parameters into (1,) ones, skips parameter-less blocks
    from megabatch_train import fsdp

    model = fsdp.shard(ZeroDim(), torch.device("cpu"), world)
    out = model.encode_image(torch.ones(2, 4))
    return {"shape": tuple(model.logit_scale.shape), "value": fsdp.scalar(model.logit_scale), "out": out.shape}


def test_single_process_checkpoint_resumes_under_fsdp(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shards = run_world(resume_sharded, 2, tmp_path / "world", str(single / "checkpoints" / "step_000002.pt"),
                       str(out), timeout=180)
    assert all(r == {"shape": (1,), "value": 2.5, "out": (2, 4)} for r in shards), shards
    same_curve(curve(out), curve(single)[2:])
    same_state(ckpt(out, STEPS), ckpt(single, STEPS))


def test_zero_dim_checkpoint_still_resumes(single: Path, tmp_path: Path) -> None:
    """A checkpoint as a model with 0-dim logit_scale / logit_bias saved it: those parameters and
    their AdamW moments 0-dim (the step count is 0-dim for every parameter)."""
    old = ckpt(single, 2)
    for name in ("logit_scale", "logit_bias"):
        old["model"][name] = old["model"][name].reshape(())
    scalars = [i for i, state in old["optimizer"]["state"].items() if state["exp_avg"].numel() == 1]
    assert len(scalars) == 2  # logit_scale and logit_bias: every other parameter has more elements
    for i in scalars:
        for k in ("exp_avg", "exp_avg_sq"):
            old["optimizer"]["state"][i][k] = old["optimizer"]["state"][i][k].reshape(())
    path = tmp_path / "step_000002.pt"
    torch.save(old, path)
    out = tmp_path / "zero_dim"
    train(from_preset("tiny", output=str(out), resume=str(path), **FLAGS))
    same_curve(curve(out), curve(single)[2:])
    same_state(ckpt(out, STEPS), ckpt(single, STEPS))


def test_fsdp_in_one_process_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--preset", "tiny", "--fsdp", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the model across ranks" in err and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()
