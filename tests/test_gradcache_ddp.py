"""GradCache under 2-rank gloo DDP (real processes): after ``gc(...)`` on every rank, the averaged
parameter gradients (both towers, logit_scale, logit_bias) equal the single-process full-batch
gradient of the loss on the concatenated global batch, the ranks' returned losses average to the
global loss, and DDP all-reduces once per call (a comm hook counts the buckets it is given: one
bucket per wrapper), not once per micro-batch. Wirings: one DDP wrapper holding both towers with ``ddp.module`` methods as
encoders and the wrapper in ``modules=`` (with and without find_unused_parameters), and two wrapped
towers passed as the encoders. GradCache warns when distributed without any DDP wrapper.

The loss is megabatch's own distributed loss, strategy "ring" and "gather" (the docs/design.md
convention: rank feature gradient = W dL/dx_r, mean of the ranks' losses = the global loss).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import megabatch as mb
from _dist_utils import run_world

WORLD, LOCAL, MICRO, DIM = 2, 5, 2, 6
KINDS = ("clip", "siglip")
WIRINGS = ("driven", "driven_unused", "called")
STRATEGIES = ("ring", "gather")


class Image(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, DIM))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(t), dim=-1)


class Dual(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.image, self.text = Image(bias), Text()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.text(t)


def make_model(kind: str) -> Dual:
    torch.manual_seed(0)
    return Dual(bias=kind == "siglip").double()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * LOCAL
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)


def local_loss(kind: str):
    if kind == "clip":
        return lambda x, y, s: mb.clip_loss(x, y, s, strategy="local")
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, strategy="local")


def distributed_loss(kind: str, strategy: str):
    if kind == "clip":
        return lambda x, y, s: mb.clip_loss(x, y, s, strategy=strategy)
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, strategy=strategy)


def loss_args(image: Image) -> tuple:
    s = image.logit_scale.exp()
    return (s,) if image.logit_bias is None else (s, image.logit_bias)


def counting(ddp: DDP) -> list[int]:
    count = [0]

    def hook(state, bucket):
        count[0] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return count


def run(kind: str, wiring: str, strategy: str, rank: int) -> dict:
    model = make_model(kind)
    loss_fn = distributed_loss(kind, strategy)
    if wiring == "called":
        wrappers = [DDP(model.image, bucket_cap_mb=64), DDP(model.text, bucket_cap_mb=64)]
        gc = mb.GradCache(wrappers[0], wrappers[1], loss_fn, MICRO)
    else:
        wrappers = [DDP(model, bucket_cap_mb=64, find_unused_parameters=wiring == "driven_unused")]
        gc = mb.GradCache(model.encode_image, model.encode_text, loss_fn, MICRO, modules=wrappers)
    counts = [counting(w) for w in wrappers]
    out: dict = {"counts": [], "losses": []}
    for step in range(2):  # the second step checks the reducer is left in a clean state
        model.zero_grad(set_to_none=True)
        images, texts = (t[rank * LOCAL : (rank + 1) * LOCAL] for t in global_batch(step))
        before = [c[0] for c in counts]
        out["losses"].append(gc(images, texts, *loss_args(model.image)))
        out["counts"].append([c[0] - b for c, b in zip(counts, before)])
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


def worker(rank: int, world: int) -> dict:
    results = {(k, w, st): run(k, w, st, rank) for k in KINDS for w in WIRINGS for st in STRATEGIES}
    model = make_model("clip")
    gc = mb.GradCache(model.encode_image, model.encode_text, distributed_loss("clip", "ring"), MICRO)
    images, texts = (t[rank * LOCAL : (rank + 1) * LOCAL] for t in global_batch(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc(images, texts, *loss_args(model.image))
    results["warned"] = any("no DistributedDataParallel" in str(w.message) for w in caught)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_world(worker, WORLD, tmp_path_factory.mktemp("gradcache_ddp"))


def reference(kind: str, step: int) -> tuple[torch.Tensor, dict]:
    model = make_model(kind)
    images, texts = global_batch(step)
    loss = local_loss(kind)(model.encode_image(images), model.encode_text(texts), *loss_args(model.image))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_matches_single_process_full_batch(results: list[dict], kind: str, wiring: str, strategy: str) -> None:
    _, want = reference(kind, step=1)
    assert ("image.logit_bias" in want) == (kind == "siglip")
    for step in range(2):  # the mean of the ranks' losses is the global loss
        mean = sum(res[(kind, wiring, strategy)]["losses"][step] for res in results) / WORLD
        assert torch.allclose(mean, reference(kind, step)[0], rtol=1e-12, atol=0), step
    for rank, res in enumerate(results):
        got = res[(kind, wiring, strategy)]
        assert got["grads"].keys() == want.keys()
        for name, g in want.items():
            err = ((got["grads"][name] - g).norm() / g.norm()).item()
            assert err < 1e-10, f"rank {rank} {name}: rel err {err:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_allreduces_once_per_call(results: list[dict], kind: str, wiring: str, strategy: str) -> None:
    wrappers = 2 if wiring == "called" else 1
    assert math.ceil(LOCAL / MICRO) == 3  # three micro-batches per rank, one sync
    for res in results:
        assert res[(kind, wiring, strategy)]["counts"] == [[1] * wrappers, [1] * wrappers]


def test_warns_without_ddp_wrapper(results: list[dict]) -> None:
    assert all(res["warned"] for res in results)
