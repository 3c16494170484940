"""Contract of megabatch.integrations.hf against Hugging Face's own loss.

- ContrastiveLoss on a CLIPModel / SiglipModel / Siglip2Model (tiny random configs, float64, no
  download) gives HF's ``forward(..., return_loss=True).loss`` on the same batch, and the same
  gradient for every parameter (towers, projections, logit_scale, logit_bias): B = 1 and B = 7.
  GradCache (``micro_batch_size``, ``.backward``) gives the same gradients. The model's full forward
  (which builds HF's b x b logits) never runs: only get_image_features / get_text_features.
- Distributed (real gloo processes, W = 3, uneven local batches 3 / 5 / 2, DDP-wrapped model): the
  ranks' losses average to HF's loss on the concatenated batch, and after DDP's averaging every
  parameter gradient equals HF's full-batch gradient: CLIP and SigLIP, strategies ring and gather,
  with and without GradCache; hierarchical with ranks_per_node given (1: CLIP without GradCache,
  3: SigLIP with it), LOCAL_WORLD_SIZE unset; and under FSDP2 (fully_shard per encoder layer and the root, after
  hf.shardable makes CLIP's 0-dim logit_scale 1-element), the gathered gradients likewise (ring
  without GradCache, gather with it).
- ``import megabatch`` (and megabatch.integrations) imports nothing from transformers.
- Bad input is a clear error: a model without the feature methods or logit_scale, loss="siglip" on
  a model without logit_bias, a batch without image or text tensors or with keys neither tower takes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

import _hf_models as H  # noqa: E402
from _dist_utils import run_world  # noqa: E402
from megabatch.integrations import hf  # noqa: E402


def assert_grads_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-9) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    # Relative to the largest gradient entry: attention's key biases have an exactly-zero true
    # gradient (softmax is shift-invariant), so both sides there hold only rounding noise.
    scale = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.3g} (largest gradient entry {scale:.3g})"


@pytest.mark.parametrize("kind", H.KINDS)
@pytest.mark.parametrize("n", [1, 7])
def test_matches_hf_loss_and_every_gradient(kind: str, n: int) -> None:
    model = H.build(kind)
    inputs = H.batch(kind, n, seed=n)
    want_loss, want = H.reference(model, inputs)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))  # the swapped-in forward counts once
    loss = hf.ContrastiveLoss()(model, inputs)
    loss.backward()
    assert calls == [1]
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert_grads_equal(H.grads_of(model), want)
    model.zero_grad(set_to_none=True)
    cached = hf.ContrastiveLoss(micro_batch_size=3).backward(model, inputs)
    torch.testing.assert_close(cached, want_loss, rtol=1e-12, atol=1e-12)
    # Siglip2 resizes its position embeddings in float32 on CPU (whatever the model's dtype): its
    # gradient, summed per micro-batch, then differs by float32 rounding (measured 1.4e-8 relative).
    assert_grads_equal(H.grads_of(model), want, rtol=1e-6 if kind == "siglip2" else 1e-9)


def test_never_builds_the_local_logits() -> None:
    model = H.build("clip")
    model.forward = lambda *a, **k: pytest.fail("the model's full forward ran")  # type: ignore[method-assign]
    inputs = H.batch("clip", 5, seed=0)
    hf.ContrastiveLoss(strategy="local")(model, inputs).backward()
    assert model.logit_scale.grad is not None


def _step(loss_fn: hf.ContrastiveLoss, model: nn.Module, batch: dict) -> torch.Tensor:
    """Back-propagate: loss_fn(...).backward() without micro-batches, loss_fn.backward(...) (GradCache) with."""
    if loss_fn.micro_batch_size is None:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach()
    return loss_fn.backward(model, batch)


def _distributed(rank: int, world: int) -> dict[str, float]:
    sizes = [3, 5, 2][:world]
    start = sum(sizes[:rank])
    losses = {}
    for kind, strategy in [(k, s) for k in ("clip", "siglip") for s in ("ring", "gather")]:
        inputs = H.batch(kind, sum(sizes), seed=11)
        model = H.build(kind)
        want_loss, want = H.reference(model, inputs)
        local = H.rows(inputs, start, start + sizes[rank])
        for micro in (None, 2):
            model.zero_grad(set_to_none=True)
            ddp = DDP(model)
            loss = _step(hf.ContrastiveLoss(strategy=strategy, micro_batch_size=micro), ddp, local)
            mean = loss.detach().clone()
            torch.distributed.all_reduce(mean)
            torch.testing.assert_close(mean / world, want_loss, rtol=1e-11, atol=1e-12)
            assert_grads_equal(H.grads_of(model), want, rtol=1e-9)
            losses[f"{kind}/{strategy}/{micro}"] = (mean / world).item()
        # FSDP2: every encoder layer, then the root (0-dim logit_scale made 1-element)
        fsdp = hf.shardable(H.build(kind))
        for m in fsdp.modules():
            if type(m).__name__.endswith("EncoderLayer"):
                fully_shard(m)
        fully_shard(fsdp)
        micro = None if strategy == "ring" else 2
        loss = _step(hf.ContrastiveLoss(strategy=strategy, micro_batch_size=micro), fsdp, local)
        got = {n: p.grad.full_tensor().reshape(want[n].shape) for n, p in fsdp.named_parameters()}
        assert_grads_equal(got, want, rtol=1e-9)
        losses[f"{kind}/{strategy}/fsdp2/{micro}"] = loss.item()
    # hierarchical with ranks_per_node given (3 nodes of 1 rank: a ring; 1 node of 3: a gather), and
    # LOCAL_WORLD_SIZE unset so that only the keyword can tell the loss
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    for kind, rpn, micro in (("clip", 1, None), ("siglip", world, 2)):
        inputs = H.batch(kind, sum(sizes), seed=12)
        model = H.build(kind)
        want_loss, want = H.reference(model, inputs)
        loss_fn = hf.ContrastiveLoss(strategy="hierarchical", ranks_per_node=rpn, micro_batch_size=micro)
        loss = _step(loss_fn, DDP(model), H.rows(inputs, start, start + sizes[rank]))
        torch.distributed.all_reduce(loss)
        torch.testing.assert_close(loss / world, want_loss, rtol=1e-11, atol=1e-12)
        assert_grads_equal(H.grads_of(model), want, rtol=1e-9)
        losses[f"{kind}/hierarchical/{rpn}/{micro}"] = (loss / world).item()
    return losses


def test_distributed_three_ranks_uneven_matches_hf_full_batch(tmp_path) -> None:
    results = run_world(_distributed, 3, tmp_path, timeout=180)
    assert len(results) == 3 and all(len(r) == 14 for r in results)


def test_import_megabatch_imports_no_transformers() -> None:
    code = ("import sys, megabatch, megabatch.integrations; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _NoFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def get_image_features(self, pixel_values):
        return pixel_values


def test_bad_inputs_are_clear_errors() -> None:
    inputs = H.batch("clip", 3, seed=0)
    with pytest.raises(TypeError, match="_NoFeatures has no get_text_features"):
        hf.ContrastiveLoss()(_NoFeatures(), inputs)
    with pytest.raises(TypeError, match="Linear has no get_image_features, get_text_features, logit_scale"):
        hf.ContrastiveLoss()(nn.Linear(2, 2), inputs)
    clip = H.build("clip")
    with pytest.raises(ValueError, match="loss='siglip' needs a logit_bias"):
        hf.ContrastiveLoss(loss="siglip")(clip, inputs)
    with pytest.raises(ValueError, match="inputs has no image tensors.*pixel_values"):
        hf.ContrastiveLoss()(clip, {"input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match=r"keys \['captions'\]"):
        hf.ContrastiveLoss()(clip, {**inputs, "captions": torch.zeros(3)})
    with pytest.raises(TypeError, match="inputs must be a mapping"):
        hf.ContrastiveLoss()(clip, [inputs["pixel_values"]])
    with pytest.raises(RuntimeError, match=r"call \.backward\(model, inputs\)"):
        hf.ContrastiveLoss(micro_batch_size=2)(clip, inputs)
    for bad in (dict(loss="infonce"), dict(strategy="tree"), dict(micro_batch_size=0), dict(directions="up")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            hf.ContrastiveLoss(**bad)
    with pytest.raises(ValueError, match="ranks_per_node is only for strategy='hierarchical', got strategy='ring'"):
        hf.ContrastiveLoss(strategy="ring", ranks_per_node=2)
    with pytest.raises(ValueError, match="ranks_per_node must be >= 1, got 0"):
        hf.ContrastiveLoss(strategy="hierarchical", ranks_per_node=0)
    # the evaluation copy (ContrastiveTrainer's, without micro-batches) keeps it
    cached = hf.ContrastiveLoss(strategy="hierarchical", ranks_per_node=2, micro_batch_size=2)
    assert cached._whole().ranks_per_node == 2
