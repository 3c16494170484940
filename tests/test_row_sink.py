"""Contract: the "finished rows" path of the block kernels (kernels/base.py, `rows=`) and the memory it
buys the local strategy.

- Every backend (dense, torch with tiny tiles, triton with several super-blocks) hands each row of
  gx to the sink exactly once, the chunks equal the gx it returns without a sink, gy and the other
  results are unchanged, and gx comes back None.
- (Their values against the float64 reference: the local strategy always takes this path, so
  test_losses.py and test_triton_kernels.py check it end to end.)
- The local strategy with 16-bit features never allocates a compute-dtype (fp32) tensor the size of
  the row side during forward+backward, only the one gy accumulator: an allocation census through
  a TorchDispatchMode (every fresh tensor an aten op returns, by dtype and size), which is exact
  and independent of the allocator, unlike a peak-RSS reading.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megabatch as mb
from megabatch import _numerics
from megabatch.kernels import DenseKernels, TorchChunkedKernels
from megabatch.kernels.base import Positives


def _backends() -> dict:
    out = {"dense": DenseKernels(), "torch-tiny-tiles": TorchChunkedKernels(tile_elements=1)}
    try:
        from megabatch.kernels.triton_kernels import TritonConfig, TritonKernels, interpreting
    except ImportError:  # the triton backend's own tests say so loudly; here it is one backend of three
        return out
    if torch.cuda.is_available() or interpreting():
        # 16-row tiles, 32 x 64 super-blocks: 70 rows are three row blocks, the last one partial.
        out["triton-tiled"] = TritonKernels(TritonConfig(16, 16, 16, 16, 16, 16, 32, 64, num_warps=4, num_stages=1,
                                                         gemm_warps=4, gemm_stages=1, merge_block=32))
    return out


BACKENDS = _backends()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _features(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE)


class _Chunks:
    def __init__(self) -> None:
        self.got: list[tuple[int, torch.Tensor]] = []

    def __call__(self, r0: int, chunk: torch.Tensor) -> None:
        self.got.append((r0, chunk.clone()))  # the chunk may be a reused buffer
        chunk.fill_(float("nan"))  # the sink may overwrite it: the backend must not read it again

    def assemble(self, b: int, d: int) -> torch.Tensor:
        out = torch.full((b, d), float("nan"), dtype=self.got[0][1].dtype, device=self.got[0][1].device)
        seen = torch.zeros(b, dtype=torch.int64)
        for r0, chunk in self.got:
            out[r0 : r0 + chunk.shape[0]] = chunk
            seen[r0 : r0 + chunk.shape[0]] += 1
        assert torch.equal(seen, torch.ones(b, dtype=torch.int64)), f"rows handed over {seen.tolist()} times"
        return out


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("b,n,d", [(70, 45, 19), (1, 1, 5), (33, 70, 8)])
@pytest.mark.parametrize("diagonal", [False, True, "ids"])
def test_every_row_handed_over_once(name, b, n, d, diagonal):
    kernels = BACKENDS[name]
    x, y = _features(b, d, seed=b), _features(n, d, seed=n + 1)
    s, beta = torch.tensor(14.0, device=DEVICE), torch.tensor(-6.0, device=DEVICE)
    if diagonal == "ids":
        g = torch.Generator().manual_seed(b)
        pos = Positives(image_ids=torch.randint(0, 5, (b,), generator=g).to(DEVICE),
                        text_ids=torch.randint(0, 5, (n,), generator=g).to(DEVICE))
    else:
        pos = Positives.index(0, min(b, n), b, n) if diagonal else None
    r, c = kernels.clip_stats(x, y, s, pos)[:2]
    gx, gy = kernels.clip_grads(x, y, s, r, c, weight=0.25, pos=pos)
    sink = _Chunks()
    none, gy2 = kernels.clip_grads(x, y, s, r, c, weight=0.25, pos=pos, rows=sink)
    assert none is None and torch.equal(gy2, gy)
    torch.testing.assert_close(sink.assemble(b, d), gx, rtol=0, atol=0)

    full = kernels.siglip_block(x, y, s, beta, weight=0.5, pos=pos, grads=True)
    sink = _Chunks()
    loss, none, gy2, gbias = kernels.siglip_block(x, y, s, beta, weight=0.5, pos=pos, grads=True, rows=sink)
    assert none is None and torch.equal(loss, full[0]) and torch.equal(gy2, full[2]) and torch.equal(gbias, full[3])
    torch.testing.assert_close(sink.assemble(b, d), full[1], rtol=0, atol=0)

    sink = _Chunks()
    assert kernels.siglip_block(x, y, s, beta, weight=0.5, pos=pos, grads=False, rows=sink)[1:] == (
        None, None, None)
    assert sink.got == [], "the sink was called by a call that computes no gradients"


class _AllocationCensus(TorchDispatchMode):
    """Records (dtype, shape) of every fresh tensor an aten op returns inside the block: an output
    whose storage is none of the op's inputs' (so not a view, nor an in-place result)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in _tensors(args) + _tensors(kwargs)}
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in ins:
                self.seen.append((t.dtype, tuple(t.shape)))
        return out

    def count(self, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """How many fresh tensors of this dtype had (at least) this shape."""
        return sum(dt == dtype and len(sh) == len(shape) and all(a >= b for a, b in zip(sh, shape))
                   for dt, sh in self.seen)


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "dense"])  # dense holds b x n anyway
def test_local_keeps_one_fp32_accumulator(kind, name, monkeypatch):
    """16-bit features, b = 300 rows of D = 24: the only fp32 (b, D) tensor allocated is gy; the row
    side is finished chunk by chunk in fp16. (The torch backend also upcasts y to fp32 for its
    products, once per pass: CLIP's two passes and SigLIP's one add 2 and 1.) The row chunks of the
    O(b.D) helpers are shrunk to 64 rows, as at B = 1M they are a small fraction of b."""
    b, d = 300, 24
    monkeypatch.setattr(_numerics, "ROW_CHUNK", 64)
    x = _features(b, d, seed=1).half().requires_grad_()
    y = _features(b, d, seed=2).half().requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    beta = torch.tensor(-5.0, device=DEVICE, requires_grad=True)
    with _AllocationCensus() as census:
        if kind == "clip":
            loss = mb.clip_loss(x, y, s, backend=BACKENDS[name], strategy="local")
        else:
            loss = mb.siglip_loss(x, y, s, beta, backend=BACKENDS[name], strategy="local")
        loss.backward()
    full = census.count(torch.float32, (b, d))
    expected = 1 + (0 if name.startswith("triton") else 2 if kind == "clip" else 1)
    assert full == expected, f"{full} fp32 (b, D) tensors, expected {expected}: {sorted(set(census.seen), key=str)}"
    assert x.grad is not None and x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    assert census.count(torch.float16, (b, d)) >= 2, "the census missed the fp16 feature gradients"


def test_census_sees_a_full_fp32_row_accumulator():
    """The census is not blind: without the sink the kernels allocate the (b, D) fp32 gx it counts."""
    b, d = 300, 24
    x, y = _features(b, d, seed=1).half(), _features(b, d, seed=2).half()
    s = torch.tensor(10.0, device=DEVICE)
    kernels = TorchChunkedKernels(tile_elements=1)
    r, c = kernels.clip_stats(x, y, s, None)[:2]
    with _AllocationCensus() as census:
        kernels.clip_grads(x, y, s, r, c, weight=1.0, pos=Positives.index(0, x.shape[0], x.shape[0], y.shape[0]))
    assert census.count(torch.float32, (b, d)) == 3  # y upcast, gx, gy
    assert census.count(torch.float32, (b, d + 1)) == 0
