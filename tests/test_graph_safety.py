"""Contract: the single-process losses never read a tensor's value on the host, and they trace.

- No host sync: forward and backward of clip_loss / siglip_loss (strategy local; backends torch,
  dense and triton) run no `aten._local_scalar_dense` (what `.item()`, `float(t)`, `if t:` call),
  checked by a TorchDispatchMode that raises on it -- on CPU, so CI checks what on a GPU would be
  a stream sync. (Distributed strategies read the ranks' sizes once by design: not covered here.)
  With positives by ids too: the tile-compare path (what non-CPU devices run) reads nothing; the
  torch backend's listed-pairs path, which runs only on CPU tensors, reads the pair count with
  `.tolist()` (no device there to sync with) and is checked to call no `_local_scalar_dense`.
- torch.compile(fullgraph=True) traces the ids path too (traced code compares ids in the tiles).
- torch.compile(fullgraph=True) traces both losses with the torch backend (no graph break) and
  gives the eager values and gradients (backend "aot_eager": dynamo + AOTAutograd, seconds on CPU;
  inductor was checked by hand, 16 s, same answers).
- With the triton backend the loss is a torch.library custom op (megabatch/losses/ops.py), opaque
  to dynamo but no graph break: fullgraph=True works too and gives the eager answers (checked
  through the interpreter on CPU; on a GPU the same code path runs, but it has not been run there).
  tests/test_compile.py checks the ops, the graphs and the distributed strategies under compile.
  CUDA graphs need a GPU: not covered here.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megabatch as mb

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


def _backends() -> list[str]:
    names = ["torch", "dense"]
    try:
        from megabatch.kernels.triton_kernels import interpreting
    except ImportError:
        return names
    if torch.cuda.is_available() or interpreting():
        names.append("triton")
    return names


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _leaves(b: int = 37, d: int = 19):
    g = torch.Generator().manual_seed(b)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE).requires_grad_()
    return (x, y, torch.tensor(12.0, device=DEVICE, requires_grad=True),
            torch.tensor(-6.0, device=DEVICE, requires_grad=True))


def _loss(kind: str, backend: str = "torch", ids: bool = False):
    kw = {}
    if ids:  # repeated ids, some rows without a positive
        kw = dict(image_ids=(torch.arange(37, device=DEVICE) % 11), text_ids=(torch.arange(37, device=DEVICE) % 13))
    if kind == "clip":
        return lambda x, y, s, b: mb.clip_loss(x, y, s, backend=backend, strategy="local", **kw)
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, backend=backend, strategy="local", **kw)


@pytest.fixture(params=["index", "ids-listed", "ids-tiles"])
def positives(request, monkeypatch):
    """index positives; ids with the torch backend's listed pairs (CPU); ids compared in the tiles."""
    if request.param == "ids-tiles":
        from megabatch.kernels import torch_chunked

        monkeypatch.setattr(torch_chunked, "SPARSE_LIMIT", -1)
    return request.param


def test_the_guard_catches_item():
    with pytest.raises(AssertionError, match="host read"):
        with _NoHostReads():
            torch.ones(3, device=DEVICE).sum().item()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", _backends())
def test_no_host_sync_in_forward_and_backward(kind, backend, positives):
    leaves = _leaves()
    with _NoHostReads():
        loss = _loss(kind, backend, positives != "index")(*leaves)
        loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves[: 3 if kind == "clip" else 4])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "triton" in _backends() else []))
@pytest.mark.parametrize("ids", [False, True], ids=["index", "ids"])
def test_torch_compile_matches_eager(kind, backend, ids):
    torch._dynamo.reset()
    fn = _loss(kind, backend, ids)  # with ids, traced code takes the tile-compare path (no host read)
    eager = _leaves()
    want = fn(*eager)
    want.backward()
    compiled = _leaves()
    # fullgraph: any graph break fails the test (triton runs as a custom op, see test_compile.py).
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    used = 3 if kind == "clip" else 4
    for a, b in zip(compiled[:used], eager[:used]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
