"""Contract: clip_loss and siglip_loss (strategy local) equal the float64 dense reference — loss and
the gradients of both features, logit_scale and logit_bias — within 2x plain PyTorch's own error at
the inputs' precision, for every backend, over odd shapes (B=1, primes, D=3/129), float32, bfloat16
and float16, scales 1..100, biases -12..0, and unnormalised features whose logits reach the
hundreds; the chunked backend is also run with tiny tiles so every row-chunk boundary case occurs.
gradcheck passes in float64 for every input.
Beyond the textbook batch (same rule, same reference): rectangular batches (more texts than images:
hard negatives; fewer), positives by ids (hypothesis-drawn, repeated, none for some rows), one-way
CLIP (image_to_text, text_to_image), ids that form a permutation giving exactly the textbook loss,
and loss values near zero (s = 90, B = 300; B = 1 with logits in the thousands) as exact as plain
cross-entropy."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megabatch as mb
from megabatch.kernels import DenseKernels, TorchChunkedKernels

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


def _fn(kind: str, kernels, **kw):
    """The loss on one process with a given kernels instance (and ids / directions keywords)."""
    if kind == "clip":
        return lambda x, y, s: mb.clip_loss(x, y, s, backend=kernels, strategy="local", **kw)
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, backend=kernels, strategy="local", **kw)


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
    assert torch.autograd.gradcheck(_fn("clip", k), (x, y, s))
    assert torch.autograd.gradcheck(_fn("siglip", k), (x, y, s, b))
    # Rectangular, ids with repeats, one-way (small: each gradcheck step is a full loss call).
    xs = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    yn = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(image_ids=torch.tensor([0, 1, 2, 0, 1, 5, 7]), text_ids=torch.tensor([1, 0, 2, 9, 1, 5, 3, 0, 8]))
    assert torch.autograd.gradcheck(_fn("clip", k, directions="text_to_image", **kw), (xs, yn, s))
    assert torch.autograd.gradcheck(_fn("siglip", k, **kw), (xs, yn, s, b))
    # Second use of the same graph is not supported, but a fresh call per gradcheck step is.
    assert torch.autograd.gradcheck(lambda *a: mb.siglip_loss(*a, backend="torch"), (x, y, s, b))
    assert torch.autograd.gradcheck(lambda *a: mb.clip_loss(*a, backend="torch"), (x, y, s))


def _rect(b: int, n: int, d: int, dtype: torch.dtype, scale: float, seed: int, spread: float = 1.0):
    """b images, n texts (text i < min(b, n) resembles image i: its positive); the rest negatives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) * spread
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) * spread
    m = min(b, n)
    y[:m] = (y[:m] + 0.5 * x[:m]) / 1.5
    t = torch.float32 if dtype != torch.float64 else dtype
    return x.to(dtype), y.to(dtype), torch.tensor(scale, dtype=t), torch.tensor(-7.0, dtype=t)


RECT = [(1, 4), (5, 1), (7, 19), (64, 200), (130, 45)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("kernels", ["torch-tiny-tiles", "dense"])
@pytest.mark.parametrize("b,n", RECT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rectangular_batches(kind, kernels, b, n, dtype):
    x, y, s, bias = _rect(b, n, 17, dtype, 20.0, seed=b * 31 + n)
    check_against_reference(kind, _fn(kind, KERNELS[kernels]), x, y, s, bias if kind == "siglip" else None)


@pytest.mark.parametrize("directions", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("kernels", ["torch-tiny-tiles", "dense"])
def test_one_way(directions, kernels):
    x, y, s, _ = _rect(40, 97, 13, torch.float32, 20.0, seed=5)  # hard negatives: the MNRL setting
    check_against_reference("clip", _fn("clip", KERNELS[kernels], directions=directions), x, y, s,
                            directions=directions)


def _ids(draw_b: int, n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (draw_b,), generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind,directions", [("clip", "both"), ("clip", "image_to_text"), ("siglip", "both")])
@pytest.mark.parametrize("kernels", ["torch", "torch-tiny-tiles", "torch-tiles-compare", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ids(kind, kernels, dtype, directions, monkeypatch):
    if kernels == "torch-tiles-compare":  # the path other devices run: every tile compares the ids
        from megabatch.kernels import torch_chunked

        monkeypatch.setattr(torch_chunked, "SPARSE_LIMIT", -1)
        kernels = "torch-tiny-tiles"
    x, y, s, bias = _rect(67, 90, 21, dtype, 25.0, seed=11)
    ids = _ids(67, 90, 23, seed=12)  # repeats on both sides; some rows and columns without a positive
    kw = dict(image_ids=ids[0], text_ids=ids[1])
    if kind == "clip":
        check_against_reference("clip", _fn("clip", KERNELS[kernels], directions=directions, **kw), x, y, s,
                                ids=ids, directions=directions)
    else:
        check_against_reference("siglip", _fn("siglip", KERNELS[kernels], **kw), x, y, s, bias, ids=ids)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 60),
    n=st.integers(1, 60),
    d=st.integers(1, 40),
    classes=st.integers(1, 80),
    scale=st.floats(1.0, 100.0),
    kind=st.sampled_from(["clip", "siglip"]),
    directions=st.sampled_from(["both", "image_to_text", "text_to_image"]),
    seed=st.integers(0, 2**16),
)
def test_ids_property(b, n, d, classes, scale, kind, directions, seed):
    x, y, s, bias = _rect(b, n, d, torch.float32, scale, seed)
    ids = _ids(b, n, classes, seed + 1)
    mask = ids[0][:, None] == ids[1][None, :]
    if not mask.any():  # no positive at all: NaN by definition (documented), checked in test_api
        ids = (ids[0], torch.cat([ids[0][:1], ids[1][1:]]))
    kw = dict(image_ids=ids[0], text_ids=ids[1])
    if kind == "clip":
        check_against_reference("clip", _fn("clip", KERNELS["torch-tiny-tiles"], directions=directions, **kw),
                                x, y, s, ids=ids, directions=directions)
    else:
        check_against_reference("siglip", _fn("siglip", KERNELS["torch-tiny-tiles"], **kw), x, y, s, bias, ids=ids)


@pytest.mark.parametrize("kernels", ["torch", "dense"])
def test_permutation_ids_are_the_textbook_loss(kernels):
    x, y, s, bias = _inputs(50, 16, torch.float64, 10.0, -5.0, seed=9)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    kw = dict(image_ids=perm + 1000, text_ids=perm + 1000)
    for kind in ("clip", "siglip"):
        args = (x, y, s) if kind == "clip" else (x, y, s, bias)
        a, b = _fn(kind, KERNELS[kernels])(*args), _fn(kind, KERNELS[kernels], **kw)(*args)
        assert torch.allclose(a, b, rtol=1e-12, atol=0), (kind, float(a), float(b))


@pytest.mark.parametrize("kernels", ["torch", "torch-tiny-tiles", "dense"])
def test_loss_near_zero_as_exact_as_plain(kernels):
    # s = 90, normalised float32 features: the true loss is ~1e-7 (a row-wise dot for the positive
    # logits, as before, gave ~4e-7 here); B = 1 with logits in the thousands: exactly 0.
    x, y, s, _ = _inputs(300, 64, torch.float32, 90.0, 0.0, seed=1)
    y = torch.nn.functional.normalize(x.double() + 3.2 * y.double(), dim=-1).float()
    true = float(mb.clip_loss_reference(x.double(), y.double(), s.double()))
    assert 1e-8 < true < 1e-6
    errs = check_against_reference("clip", _fn("clip", KERNELS[kernels]), x, y, s)
    assert errs[0] < 0.02
    x1 = torch.full((1, 8), 10.0)
    loss = _fn("clip", KERNELS[kernels])(x1, x1 * 1.5, torch.tensor(20.0))
    assert float(loss) == 0.0  # logits 30,000: lse - S_00 exactly 0, as plain log_softmax gives
    ids = (torch.arange(300), torch.arange(300))
    check_against_reference("clip", _fn("clip", KERNELS[kernels], image_ids=ids[0], text_ids=ids[1]), x, y, s, ids=ids)
