"""Contract: the public API's surface — argument validation with errors that name the argument,
scalar handling (float or 0-dim tensor, gradients shaped like the parameter), dtypes of results,
NaN propagation, forward-only use, autocast, the nn.Module wrappers' open_clip-compatible forward,
backend/strategy selection, and the positives keywords (ids of the wrong shape, dtype or device,
only one of the two, an unknown direction; a batch without any positive gives NaN, not an error)."""
from __future__ import annotations

import math

import pytest
import torch

import megabatch as mb
from megabatch.kernels import DenseKernels, TorchChunkedKernels, get_backend


def _xy(b=5, d=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


LOSSES = {
    "clip": lambda x, y, **kw: mb.clip_loss(x, y, 10.0, **kw),
    "siglip": lambda x, y, **kw: mb.siglip_loss(x, y, 10.0, -5.0, **kw),
}


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda: (torch.randn(4, 3), torch.randn(4, 2)), ValueError, "same feature dim"),
        (lambda: (torch.randn(4), torch.randn(4, 3)), ValueError, "image_features must be 2-D"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3, 1)), ValueError, "text_features must be 2-D"),
        (lambda: (torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty batch"),
        (lambda: (torch.randn(3, 0), torch.randn(3, 0)), ValueError, "feature dim 0"),
        (lambda: (torch.ones(4, 3, dtype=torch.int64), torch.randn(4, 3)), TypeError, "image_features must be float"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)), TypeError, "share a dtype"),
        (lambda: (torch.randn(4, 3).numpy(), torch.randn(4, 3)), TypeError, "image_features must be a torch.Tensor"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError, "same device"),
    ],
)
def test_bad_features(kind, make, exc, words):
    x, y = make()
    with pytest.raises(exc, match=words):
        LOSSES[kind](x, y)


def test_bad_scalars_and_names():
    x, y = _xy()
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        mb.clip_loss(x, y, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale must be a float"):
        mb.clip_loss(x, y, "10")
    with pytest.raises(TypeError, match="logit_scale must be a floating tensor"):
        mb.clip_loss(x, y, torch.tensor(10))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        mb.siglip_loss(x, y, 10.0, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="logit_bias is on meta"):
        mb.siglip_loss(x, y, 10.0, torch.zeros((), device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        mb.clip_loss(x, y, 10.0, backend="cuda")
    with pytest.raises(ValueError, match="strategy must be one of"):
        mb.siglip_loss(x, y, 10.0, 0.0, strategy="allgather")
    with pytest.raises(ValueError, match="needs torch.distributed"):
        mb.clip_loss(x, y, 10.0, strategy="ring")
    with pytest.raises(TypeError, match="group must be"):
        mb.clip_loss(x, y, 10.0, group="world")
    with pytest.raises(ValueError, match="strategy must be one of"):
        mb.ClipLoss(strategy="nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        mb.SigLipLoss(backend="nope")


def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    # Without a GPU (and without the interpreter) asking for Triton is a clear error, not a crash.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = _xy()
    with pytest.raises(ValueError, match="backend='triton'"):
        mb.clip_loss(x, y, 10.0, backend="triton")


def test_auto_backend_on_cpu_is_torch_never_dense():
    assert isinstance(get_backend("auto", torch.device("cpu")), TorchChunkedKernels)
    assert isinstance(get_backend("dense", torch.device("cpu")), DenseKernels)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_result_and_gradient_dtypes(kind, dtype):
    x, y = (t.requires_grad_(True) for t in _xy(dtype=dtype))
    scale = torch.tensor(5.0, requires_grad=True)  # a float32 parameter, as in open_clip
    args = (scale,) if kind == "clip" else (scale, torch.tensor([-3.0], requires_grad=True))
    loss = (mb.clip_loss if kind == "clip" else mb.siglip_loss)(x, y, *args)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    for p in args:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype


@pytest.mark.parametrize("kind", LOSSES)
def test_python_float_scalars_match_tensor_scalars(kind):
    x, y = _xy()
    if kind == "clip":
        a, b = mb.clip_loss(x, y, 7.5), mb.clip_loss(x, y, torch.tensor(7.5))
    else:
        a, b = mb.siglip_loss(x, y, 7.5, -2.0), mb.siglip_loss(x, y, torch.tensor(7.5), torch.tensor(-2.0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", LOSSES)
def test_nan_input_gives_nan_loss(kind):
    x, y = _xy()
    x[2, 1] = math.nan
    assert torch.isnan(LOSSES[kind](x, y))


@pytest.mark.parametrize("kind", LOSSES)
def test_forward_only_under_no_grad_builds_no_graph(kind):
    x, y = (t.requires_grad_(True) for t in _xy())
    with torch.no_grad():
        loss = LOSSES[kind](x, y)
    assert loss.grad_fn is None and not loss.requires_grad
    assert torch.allclose(loss, LOSSES[kind](x.detach(), y.detach()))


@pytest.mark.parametrize("kind", LOSSES)
def test_autocast_does_not_lower_the_loss_precision(kind):
    x, y = _xy(b=33, d=16)
    ref = LOSSES[kind](x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES[kind](x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_modules_match_functional_and_output_dict():
    x, y = _xy(b=9, d=6)
    s, bias = torch.tensor(4.0), torch.tensor(-2.0)
    assert torch.equal(mb.ClipLoss()(x, y, s), mb.clip_loss(x, y, s))
    assert torch.equal(mb.SigLipLoss()(x, y, s, bias), mb.siglip_loss(x, y, s, bias))
    out = mb.ClipLoss(output_dict=True)(x, y, s)
    assert set(out) == {"contrastive_loss"} and torch.equal(out["contrastive_loss"], mb.clip_loss(x, y, s))
    assert torch.is_tensor(mb.SigLipLoss(output_dict=True)(x, y, s, bias, output_dict=False))
    assert "strategy='auto'" in repr(mb.ClipLoss())


def test_any_real_number_is_a_scale_or_bias():
    """numpy.float32 (and numpy.float64, numpy.int64, a Python int, a 0-dim numpy array) is a scale
    and a bias like the Python float of its value: same loss, bit for bit, functions and modules."""
    np = pytest.importorskip("numpy")
    x, y = _xy(b=6, d=4)
    want_clip, want_siglip = mb.clip_loss(x, y, 8.0), mb.siglip_loss(x, y, 8.0, -3.0)
    for s, b in ((np.float32(8), np.float32(-3)), (np.float64(8), np.float64(-3)), (np.int64(8), np.int32(-3)),
                 (8, -3), (np.array(8.0, dtype=np.float32), np.array(-3))):
        name = type(s).__name__
        assert torch.equal(mb.clip_loss(x, y, s), want_clip), name
        assert torch.equal(mb.ClipLoss()(x, y, s), want_clip), name
        assert torch.equal(mb.siglip_loss(x, y, s, b), want_siglip), name
        assert torch.equal(mb.SigLipLoss()(x, y, s, b), want_siglip), name


def test_what_is_no_real_number_is_a_type_error_naming_the_argument():
    np = pytest.importorskip("numpy")
    x, y = _xy()
    arrays = ((np.array([8.0]), r"got numpy.ndarray of shape \(1,\)"),
              (np.array(1 + 1j), r"got numpy.ndarray of shape \(\)"))
    for bad, got in ((2 + 1j, "got complex"), ("10", "got str"), (True, "got bool"), (None, "got NoneType"), *arrays):
        with pytest.raises(TypeError, match=r"logit_scale must be a float \(any real number: int, numpy.float32, "
                                            rf"...\) or a 0-dim floating tensor, {got}"):
            mb.clip_loss(x, y, bad)
        with pytest.raises(TypeError, match=rf"logit_bias must be a float \(any real number.* {got}"):
            mb.siglip_loss(x, y, 8.0, bad)
    with pytest.raises(TypeError, match="logit_scale must be a floating tensor, got torch.int64"):
        mb.SigLipLoss()(x, y, torch.tensor(8), -3.0)


def test_clip_loss_module_refuses_a_bias_in_open_clips_output_dict_place():
    """ClipLoss's 4th positional argument is open_clip's output_dict: a SigLIP bias there used to give
    a dict silently."""
    x, y = _xy()
    s, bias = torch.tensor(8.0), torch.tensor(-3.0)
    for bad in (bias, -3.0, 0, "yes"):
        with pytest.raises(TypeError, match=r"ClipLoss takes no logit_bias; the 4th positional argument is "
                                            r"open_clip's output_dict \(a bool\), got \w+: for a sigmoid loss "
                                            r"with a bias use megabatch.SigLipLoss"):
            mb.ClipLoss()(x, y, s, bad)
    with pytest.raises(TypeError, match=r"the 5th positional argument of SigLipLoss is open_clip's output_dict "
                                        r"\(a bool\), got Tensor"):
        mb.SigLipLoss()(x, y, s, bias, bias)
    with pytest.raises(TypeError, match="output_dict must be a bool, got Tensor"):
        mb.ClipLoss(output_dict=bias)
    want = mb.clip_loss(x, y, s)  # open_clip's own uses still work: a bool, positional or keyword
    assert torch.equal(mb.ClipLoss()(x, y, s, True)["contrastive_loss"], want)
    assert torch.equal(mb.ClipLoss(output_dict=True)(x, y, s, False), want)
    assert torch.equal(mb.ClipLoss()(x, y, s, output_dict=True)["contrastive_loss"], want)
    assert torch.equal(mb.SigLipLoss()(x, y, s, bias, True)["contrastive_loss"], mb.siglip_loss(x, y, s, bias))


def test_modules_check_ranks_per_node_when_built():
    with pytest.raises(ValueError, match="ranks_per_node is only for strategy='hierarchical', got strategy='ring'"):
        mb.ClipLoss(strategy="ring", ranks_per_node=2)
    with pytest.raises(TypeError, match="ranks_per_node must be an int or None, got float"):
        mb.SigLipLoss(strategy="hierarchical", ranks_per_node=2.0)
    with pytest.raises(ValueError, match="ranks_per_node must be >= 1, got 0"):
        mb.ClipLoss(strategy="hierarchical", ranks_per_node=0)


def test_clip_loss_of_one_pair_is_zero_and_gradients_finite():
    x, y = (t.requires_grad_(True) for t in _xy(b=1, d=3))
    loss = mb.clip_loss(x, y, 100.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_bad_ids(kind):
    x, y = torch.randn(4, 3), torch.randn(6, 3)
    ok_i, ok_t = torch.arange(4), torch.arange(6)
    cases = [
        (dict(image_ids=ok_i), "text_ids is missing"),
        (dict(text_ids=ok_t), "image_ids is missing"),
        (dict(image_ids=ok_i.int(), text_ids=ok_t), "image_ids must be int64"),
        (dict(image_ids=ok_i, text_ids=ok_t[:5]), r"text_ids must have shape \(6,\)"),
        (dict(image_ids=ok_i[None], text_ids=ok_t), r"image_ids must have shape \(4,\)"),
        (dict(image_ids=[0, 1, 2, 3], text_ids=ok_t), "image_ids must be an int64 torch.Tensor"),
        (dict(image_ids=ok_i, text_ids=ok_t.to("meta")), "text_ids is on meta"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            LOSSES[kind](x, y, **kw)


def test_bad_directions():
    x, y = _xy()
    with pytest.raises(ValueError, match="directions must be one of"):
        mb.clip_loss(x, y, 10.0, directions="i2t")
    with pytest.raises(ValueError, match="directions must be one of"):
        mb.ClipLoss(directions="both_ways")


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_no_positive_pair_is_nan(backend):
    x, y = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    kw = dict(image_ids=torch.arange(4), text_ids=torch.arange(10, 16), backend=backend)
    for loss in (mb.clip_loss(x, y, 10.0, **kw), mb.clip_loss(x, y, 10.0, directions="text_to_image", **kw)):
        assert torch.isnan(loss)
        (gx,) = torch.autograd.grad(loss, x)
        assert torch.isnan(gx).all()
    # SigLIP is defined without positives (every pair a negative): finite.
    assert torch.isfinite(mb.siglip_loss(x, y, 10.0, -5.0, **kw))


def test_modules_take_ids_and_directions():
    x, y = torch.randn(5, 4), torch.randn(8, 4)
    ids = dict(image_ids=torch.tensor([0, 1, 2, 0, 1]), text_ids=torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))
    want = mb.clip_loss(x, y, 10.0, directions="image_to_text", **ids)
    assert torch.equal(mb.ClipLoss(directions="image_to_text")(x, y, 10.0, **ids), want)
    assert torch.equal(mb.ClipLoss()(x, y, 10.0, directions="image_to_text", **ids), want)
    assert torch.equal(mb.SigLipLoss()(x, y, 10.0, -3.0, **ids), mb.siglip_loss(x, y, 10.0, -3.0, **ids))
    assert "directions='image_to_text'" in repr(mb.ClipLoss(directions="image_to_text"))
