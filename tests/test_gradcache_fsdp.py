"""megabatch's losses with FSDP2 (`fully_shard`) towers, on 3 gloo ranks with uneven local batches
(3, 5 and 2 pairs), in float64: after one step, every parameter's gradient (gathered with
`DTensor.full_tensor()`: both towers' blocks, the root's projection, logit_scale and logit_bias,
0-dim in the model and shape (1,) once sharded) equals the single-process gradient of the loss on
the concatenated batch, and the mean of the ranks' losses is the global loss --
  * running the "FSDP2" code block of docs/integrations.md itself (CLIP, default strategy: ring
    under torchrun);
  * plainly (registered encode_* forward methods, the loss on their features and the gathered
    logit_scale), and
  * through mb.GradCache with micro-batches of 2 (so the ranks have 2, 3 and 1 micro-batches: the
    ranks with fewer re-run a filler micro-batch), where FSDP reduce-scatters each unit once per
    call (counted by wrapping torch.distributed.reduce_scatter_single, which FSDP2's default
    reduce-scatter calls), not once per micro-batch;
for CLIP (ring strategy) and SigLIP (gather strategy). With 2 hard-negative texts per rank (so the
text tower has more micro-batches than the image tower, which re-runs fillers), GradCache's FSDP
gradients equal DDP's (a replicated model's gradients under the same loss, averaged over ranks).
GradCache refuses a loss argument that is
still a sharded DTensor, with a TypeError that says how to gather it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import megabatch as mb
from _dist_utils import run_world

SIZES, MICRO = (3, 5, 2), 2
CASES = (("clip", "ring"), ("siglip", "gather"))


DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


class Tower(nn.Module):
    def __init__(self, widths: list[int], proj: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.proj = nn.Linear(widths[-1], proj) if proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.proj(x)


class Towers(nn.Module):
    """An open_clip-style pair of towers (blocks in visual.blocks / text.blocks, each its own FSDP
    unit) with 0-dim logit_scale and logit_bias; encode_* return unnormalised features."""

    def __init__(self) -> None:
        super().__init__()
        self.visual, self.text = Tower([5, 8, 8], proj=6), Tower([4, 8, 6])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.text(t)


def make_model() -> Towers:
    torch.manual_seed(0)
    return Towers().double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)


def loss_fn(kind: str, strategy: str):
    if kind == "clip":
        return lambda x, y, s, b: mb.clip_loss(x, y, s, strategy=strategy)
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, strategy=strategy)


def sharded() -> Towers:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    model = make_model()
    for name in ("logit_scale", "logit_bias"):
        setattr(model, name, nn.Parameter(getattr(model, name).detach().reshape(1)))
    for block in [*model.visual.blocks, *model.text.blocks]:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "encode_image")
    register_fsdp_forward_method(model, "encode_text")
    return model


def doc_block() -> str:
    text = DOC.read_text()
    found = re.search(r"^## FSDP2\n+```python\n(.*?)^```", text, re.S | re.M)
    assert found, "docs/integrations.md has no python block right under ## FSDP2"
    return found.group(1)


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = global_batch()
    a = sum(SIZES[:rank])
    return images[a : a + SIZES[rank]], texts[a : a + SIZES[rank]]


def run_doc_block(rank: int) -> dict:
    x, y = local_batch(rank)
    model = make_model()
    model.logit_bias = None  # a CLIP model
    scope = {"model": model, "images": x, "texts": y, "torch": torch, "F": F, "mb": mb}
    exec(doc_block(), scope)  # noqa: S102 - the documentation's own example, run as written
    model = scope["model"]
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": scope["loss"].detach(), "grads": grads}


def one_step(kind: str, strategy: str, cached: bool, rank: int) -> dict:
    model = sharded()
    x, y = local_batch(rank)
    calls = [0]
    if cached:
        normalized = [lambda v, f=f: F.normalize(f(v), dim=-1) for f in (model.encode_image, model.encode_text)]
        gc = mb.GradCache(*normalized, loss_fn(kind, strategy), MICRO, modules=model)
        model.unshard()  # gather the root: the loss arguments come from its parameters
        original = dist.reduce_scatter_single

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        dist.reduce_scatter_single = counted
        try:
            loss = gc(x, y, model.logit_scale.exp(), model.logit_bias)
        finally:
            dist.reduce_scatter_single = original
    else:
        img, txt = F.normalize(model.encode_image(x), dim=-1), F.normalize(model.encode_text(y), dim=-1)
        loss = loss_fn(kind, strategy)(img, txt, model.logit_scale.exp(), model.logit_bias)
        loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "reduce_scatters": calls[0]}


def hard_negatives(rank: int) -> dict[str, float]:
    """Relative error per parameter of FSDP + GradCache against DDP's averaged gradients."""
    x, y = local_batch(rank)
    y = torch.cat([y, torch.randn(2, 4, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)])
    ddp = make_model()
    loss = mb.clip_loss(F.normalize(ddp.encode_image(x), dim=-1), F.normalize(ddp.encode_text(y), dim=-1),
                        ddp.logit_scale.exp(), strategy="ring")
    loss.backward()
    want = {}
    for name, p in ddp.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            want[name] = p.grad / dist.get_world_size()
    model = sharded()
    normalized = [lambda v, f=f: F.normalize(f(v), dim=-1) for f in (model.encode_image, model.encode_text)]
    gc = mb.GradCache(*normalized, lambda a, b, s: mb.clip_loss(a, b, s, strategy="ring"), MICRO, modules=model)
    model.unshard()
    gc(x, y, model.logit_scale.exp())
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    return {n: ((got[n].reshape(g.shape) - g).norm() / g.norm()).item() for n, g in want.items()}


def refuses_sharded_loss_args(rank: int) -> str:
    model = sharded()
    gc = mb.GradCache(model.encode_image, model.encode_text, loss_fn("clip", "ring"), MICRO, modules=model)
    images, texts = global_batch()
    model.reshard()
    with pytest.raises(TypeError, match="DTensor") as err:
        gc(images[:2], texts[:2], model.logit_scale.exp(), model.logit_bias)
    return str(err.value)


def worker(rank: int, world: int) -> dict:
    out = {(k, s, c): one_step(k, s, c, rank) for k, s in CASES for c in (False, True)}
    out["doc_block"] = run_doc_block(rank)
    out["hard_negatives"] = hard_negatives(rank)
    out["refusal"] = refuses_sharded_loss_args(rank)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    return run_world(worker, len(SIZES), tmp_path_factory.mktemp("gradcache_fsdp"))


def reference(kind: str) -> tuple[torch.Tensor, dict]:
    model = make_model()
    images, texts = global_batch()
    img, txt = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(texts), dim=-1)
    loss = loss_fn(kind, "local")(img, txt, model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check(got_per_rank: list[dict], kind: str) -> None:
    want_loss, want = reference(kind)
    assert {"logit_scale", "visual.blocks.0.weight", "text.blocks.1.bias", "visual.proj.weight"} <= want.keys()
    assert ("logit_bias" in want) == (kind == "siglip")
    mean = sum(got["loss"] for got in got_per_rank) / len(got_per_rank)
    assert torch.allclose(mean, want_loss, rtol=1e-12, atol=0)
    for rank, got in enumerate(got_per_rank):
        assert got["grads"].keys() == want.keys()
        for name, g in want.items():
            # logit_scale / logit_bias: 0-dim in the reference, (1,) once sharded
            assert got["grads"][name].shape == (g.shape if g.dim() else (1,)), name
            err = ((got["grads"][name].reshape(g.shape) - g).norm() / g.norm()).item()
            assert err < 1e-10, f"rank {rank} {name}: rel err {err:.3g}"


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "gradcache"])
@pytest.mark.parametrize("kind, strategy", CASES)
def test_fsdp_gradients_match_single_process(results: list[dict], kind: str, strategy: str, cached: bool) -> None:
    check([res[(kind, strategy, cached)] for res in results], kind)


def test_doc_example_matches_single_process(results: list[dict]) -> None:
    check([res["doc_block"] for res in results], "clip")


@pytest.mark.parametrize("kind, strategy", CASES)
def test_gradcache_reduce_scatters_once_per_call(results: list[dict], kind: str, strategy: str) -> None:
    units = 5  # four blocks and the root, each reduce-scattered once although rank 1 runs 3 micro-batches
    for res in results:
        assert res[(kind, strategy, True)]["reduce_scatters"] == units


def test_gradcache_with_hard_negatives_matches_ddp(results: list[dict]) -> None:
    for res in results:
        errors = res["hard_negatives"]
        assert {"logit_scale", "visual.blocks.0.weight", "text.blocks.1.weight"} <= errors.keys()
        assert max(errors.values()) < 1e-10, errors


def test_gradcache_refuses_sharded_loss_arguments(results: list[dict]) -> None:
    assert all("unshard()" in res["refusal"] for res in results)
