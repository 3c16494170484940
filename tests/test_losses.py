"""Contract: clip_loss and siglip_loss (strategy local) equal the float64 dense reference — loss and
the gradients of both features, logit_scale and logit_bias — within 2x plain PyTorch's own error at
the inputs' precision, for every backend, over odd shapes (B=1, primes, D=3/129), float32, bfloat16
and float16, scales 1..100, biases -12..0, and unnormalised features whose logits reach the
hundreds; the chunked backend is also run with tiny tiles so every row-chunk boundary case occurs.
gradcheck passes in float64 for every input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megabatch as mb
from megabatch.kernels import DenseKernels, TorchChunkedKernels
from megabatch.strategies import local

from _tolerance import check_against_reference

# tile_elements=1 forces 16-row chunks: many chunks, a ragged last one, diagonals split across them.
KERNELS = {
    "torch": TorchChunkedKernels(),
    "torch-tiny-tiles": TorchChunkedKernels(tile_elements=1),
    "dense": DenseKernels(),
}


def _inputs(b: int, d: int, dtype: torch.dtype, scale: float, bias: float, spread: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) * spread
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) * spread
    # Make positives more similar than negatives, as in training, so both branches of the loss matter.
    y = (y + 0.5 * x) / 1.5
    return (
        x.to(dtype),
        y.to(dtype),
        torch.tensor(scale, dtype=torch.float32 if dtype != torch.float64 else dtype),
        torch.tensor(bias, dtype=torch.float32 if dtype != torch.float64 else dtype),
    )


def _fn(kind: str, kernels):
    if kind == "clip":
        return lambda x, y, s: local.clip(x, y, s, kernels)
    return lambda x, y, s, b: local.siglip(x, y, s, b, kernels)


SHAPES = [(1, 3), (2, 129), (7, 16), (64, 33), (300, 64), (1030, 17)]


# The dense backend stops at B=300 (its cost); the chunked ones run every shape.
CASES = [(k, b, d) for k in KERNELS for b, d in SHAPES if not (k == "dense" and b > 300)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("kernels,b,d", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(kind, kernels, b, d, dtype):
    x, y, s, bias = _inputs(b, d, dtype, scale=30.0, bias=-8.0, seed=b * 1000 + d)
    check_against_reference(kind, _fn(kind, KERNELS[kernels]), x, y, s, bias if kind == "siglip" else None)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -12.0), (100.0, -5.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scales_and_biases(kind, scale, bias, dtype):
    x, y, s, b = _inputs(37, 129, dtype, scale, bias, seed=int(scale))
    check_against_reference(kind, _fn(kind, KERNELS["torch-tiny-tiles"]), x, y, s, b if kind == "siglip" else None)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unnormalised_features_large_logits(kind, dtype):
    # |features| ~ 4, scale 50: logits reach several hundred; nothing may overflow or turn NaN.
    x, y, s, b = _inputs(130, 31, dtype, 50.0, -10.0, spread=4.0, seed=7)
    logits = s.double() * x.double() @ y.double().T
    assert logits.abs().max() > 300
    for name in ("torch", "torch-tiny-tiles", "dense"):
        loss = _fn(kind, KERNELS[name])(x, y, s, b) if kind == "siglip" else _fn(kind, KERNELS[name])(x, y, s)
        assert torch.isfinite(loss)
        check_against_reference(kind, _fn(kind, KERNELS[name]), x, y, s, b if kind == "siglip" else None)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 90),
    d=st.integers(1, 70),
    scale=st.floats(1.0, 100.0),
    bias=st.floats(-12.0, 0.0),
    spread=st.floats(0.1, 3.0),
    kind=st.sampled_from(["clip", "siglip"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_property(b, d, scale, bias, spread, kind, seed):
    x, y, s, bb = _inputs(b, d, torch.float32, scale, bias, spread, seed)
    check_against_reference(kind, _fn(kind, KERNELS["torch-tiny-tiles"]), x, y, s, bb if kind == "siglip" else None)


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_public_api_matches_reference(backend):
    x, y, s, b = _inputs(45, 20, torch.float32, 20.0, -6.0, seed=3)
    check_against_reference("clip", lambda *a: mb.clip_loss(*a, backend=backend), x, y, s)
    check_against_reference("siglip", lambda *a: mb.siglip_loss(*a, backend=backend), x, y, s, b)
    check_against_reference("clip", lambda *a: mb.ClipLoss(backend=backend)(*a), x, y, s)
    check_against_reference("siglip", lambda *a: mb.SigLipLoss(backend=backend)(*a), x, y, s, b)


@pytest.mark.parametrize("kernels", ["torch-tiny-tiles", "dense"])
def test_gradcheck_float64(kernels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(19, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    k = KERNELS[kernels]
    assert torch.autograd.gradcheck(lambda *a: local.clip(*a, k), (x, y, s))
    assert torch.autograd.gradcheck(lambda *a: local.siglip(*a, k), (x, y, s, b))
    # Second use of the same graph is not supported, but a fresh call per gradcheck step is.
    assert torch.autograd.gradcheck(lambda *a: mb.siglip_loss(*a, backend="torch"), (x, y, s, b))
    assert torch.autograd.gradcheck(lambda *a: mb.clip_loss(*a, backend="torch"), (x, y, s))
