"""Contract: the `triton` backend computes the block kernels of megabatch/kernels/base.py.

Checked here, on the GPU when there is one and otherwise on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py; small tiles):
- through the public API (backend="triton", strategy="local"): CLIP and SigLIP loss and the
  gradients of both features, logit_scale and logit_bias equal the float64 reference within
  2x the error plain PyTorch makes at the inputs' precision (plus a small floor) -- or 2x the
  torch backend's error where that is larger (an ill-conditioned dL/ds, see check()) -- and
  agree with the torch backend to the same tolerance; odd B and D (up to 1152), fp32 and fp16, scale 1..100,
  bias -12..0;
- unnormalised features with logits in the thousands stay finite and accurate;
- the block kernels directly: rectangular blocks without positives, with index positives and with
  ids, against the dense kernels in float64; SigLIP grads=False returns the same loss and no gradients;
- positives by ids, rectangular batches (hard negatives) and one-way CLIP through the public API,
  across several super-blocks, under the float64 tolerance rule (tests/_tolerance.py);
- tilings with several (partial) super-blocks give the same answers as one super-block;
- forward-only use never runs the gradient kernels; float64 inputs are delegated to torch.
The whole file is skipped only when triton cannot be imported.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

import megabatch as mb  # noqa: E402
from megabatch.kernels.dense import DenseKernels  # noqa: E402
from megabatch.kernels.triton_kernels import TritonConfig, TritonKernels  # noqa: E402
from megabatch.reference import clip_loss_reference, siglip_loss_reference  # noqa: E402
from megabatch.kernels.base import Positives  # noqa: E402

from _tolerance import check_against_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 and the cuBLAS gradient path)")
# Error floors (relative norm error) added to 2x plain PyTorch's error: fp32 covers tf32x3 on the GPU.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Tiny tiles and super-blocks so 130 pairs span several of each (interpreter-friendly sizes).
TILED = TritonConfig(16, 16, 16, 16, 16, 16, 32, 64, num_warps=4, num_stages=1, gemm_warps=4, gemm_stages=1,
                     merge_block=32)


def rel(out: torch.Tensor, ref: torch.Tensor, unit: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, unit): relative, but absolute below `unit` (a loss of 0 nats)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(unit)).item()


def features(b: int, d: int, dtype: torch.dtype, seed: int, norm: bool = True, mult: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    y = 0.6 * x + 0.8 * y  # correlated pairs, like a trained model
    if norm:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x * mult).to(dtype).to(DEVICE), (y * mult).to(dtype).to(DEVICE)


def plain_clip(x, y, s):
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def plain_siglip(x, y, s, b):
    logits = s * x @ y.T + b
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def evaluate(fn: Callable, x, y, scalars, dtype, scalar_dtype=None):
    """Loss and gradients of fn(x, y, *scalars): features in `dtype`, scalars in `scalar_dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()]
    leaves += [torch.tensor(v, dtype=scalar_dtype or dtype, device=x.device, requires_grad=True) for v in scalars]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def check(kind: str, x, y, scalars, fn: Callable, floor_dtype=None):
    """Assert fn's loss and grads are within tol of float64 and of the torch backend, where
    tol = 2 x max(plain PyTorch's error, the torch backend's error) + FLOOR[dtype]."""
    dtype = x.dtype
    reference, plain = (clip_loss_reference, plain_clip) if kind == "clip" else (siglip_loss_reference, plain_siglip)
    api = mb.clip_loss if kind == "clip" else mb.siglip_loss
    ref = evaluate(reference, x, y, scalars, torch.float64)
    base = evaluate(plain, x, y, scalars, dtype)
    ours = evaluate(fn, x, y, scalars, dtype, torch.float32)
    chunked = evaluate(lambda *a: api(*a, backend="torch", strategy="local"), x, y, scalars, dtype, torch.float32)
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    assert ours[0].dtype == torch.float32
    for name, o, r, p, c in zip(names, ours, ref, base, chunked):
        assert o.dtype == (dtype if name in ("d_image", "d_text") else torch.float32), name
        assert torch.isfinite(o).all(), f"{name} is not finite"
        unit = 1.0 if name == "loss" else 1e-6
        err, plain_err, torch_err = rel(o, r, unit), rel(p, r, unit), rel(c, r, unit)
        # The torch backend shares the family's formulas (dL/ds = sum(x * gx)), which for an
        # ill-conditioned dL/ds can sit above 2x plain PyTorch; the
        # kernel must then be within 2x of it instead: it is the contract's own best answer.
        tol = 2 * max(plain_err, torch_err) + FLOOR[floor_dtype or dtype]
        assert err <= tol, f"{name}: error {err:.3g} vs float64 > {tol:.3g} (plain {plain_err:.3g}, torch {torch_err:.3g})"
        assert rel(o, c, unit) <= tol, f"{name}: differs from the torch backend by {rel(o, c, unit):.3g} > {tol:.3g}"


def public(kind: str) -> Callable:
    api = mb.clip_loss if kind == "clip" else mb.siglip_loss
    return lambda *a: api(*a, backend="triton", strategy="local")


def tiled(kind: str, config: TritonConfig = TILED) -> Callable:
    kernels = TritonKernels(config)
    if kind == "clip":
        return lambda x, y, s, **kw: mb.clip_loss(x, y, s, backend=kernels, strategy="local", **kw)
    return lambda x, y, s, b, **kw: mb.siglip_loss(x, y, s, b, backend=kernels, strategy="local", **kw)


# (B, D, logit_scale, logit_bias): odd sizes, scale 1..100, bias -12..0.
SHAPES = [(1, 3, 10.0, -10.0), (7, 17, 1.0, 0.0), (37, 64, 100.0, -12.0), (130, 17, 30.0, -3.0),
          (23, 1152, 30.0, -10.0)]  # D = 1152: SigLIP so400m's width


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,d,s,bias", SHAPES, ids=[f"B{b}-D{d}" for b, d, _, _ in SHAPES])
def test_public_api_matches_reference(kind, dtype, b, d, s, bias):
    x, y = features(b, d, dtype, seed=b * 100 + d)
    check(kind, x, y, [s] if kind == "clip" else [s, bias], public(kind))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_unnormalised_features_with_huge_logits(kind):
    x, y = features(37, 17, torch.float32, seed=5, norm=False, mult=3.0)  # |S| reaches thousands
    assert (10.0 * x.double() @ y.double().T).abs().max() > 1000
    check(kind, x, y, [10.0] if kind == "clip" else [10.0, -10.0], public(kind))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_several_partial_super_blocks(kind, dtype):
    x, y = features(130, 33, dtype, seed=7)
    check(kind, x, y, [20.0] if kind == "clip" else [20.0, -8.0], tiled(kind))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_unmasked_and_masked_super_blocks_in_one_call(kind, dtype, monkeypatch):
    """B = 150, D = 32 with 32-wide tiles and 128-pair super-blocks: the first super-block has no
    edge tile (launched with EVEN, no masks), the others are ragged (masked); both kinds run in
    one call and the answers match the reference."""
    from megabatch.kernels.triton_kernels import _Launch

    seen = []
    real = _Launch.even
    monkeypatch.setattr(_Launch, "even", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    x, y = features(150, 32, dtype, seed=150)
    config = TritonConfig(32, 32, 32, 32, 32, 32, 128, 128, num_warps=4, num_stages=1, gemm_warps=4, gemm_stages=1,
                          merge_block=32)
    check(kind, x, y, [20.0] if kind == "clip" else [20.0, -8.0], tiled(kind, config))
    assert set(seen) == {True, False}, seen


@pytest.mark.parametrize("positives", ["none", "index", "shifted", "ids"])
@pytest.mark.parametrize("b,n,d", [(37, 70, 17), (70, 37, 3)])
def test_block_kernels_rectangular(b, n, d, positives):
    x, _ = features(b, d, torch.float32, seed=b + n)
    y, _ = features(n, d, torch.float32, seed=b * n)
    s, beta = torch.tensor(15.0, device=DEVICE), torch.tensor(-6.0, device=DEVICE)
    g = torch.Generator().manual_seed(b)
    pos = {"none": None, "index": Positives.index(0, min(b, n), b, n), "shifted": Positives.index(-5, 20, b, n),
           "ids": Positives(image_ids=torch.randint(0, 6, (b,), generator=g).to(DEVICE),
                            text_ids=torch.randint(0, 6, (n,), generator=g).to(DEVICE))}[positives]
    targets = (0.7, 0.4) if positives != "ids" else (torch.rand(b, generator=g).to(DEVICE),
                                                      torch.rand(n, generator=g).to(DEVICE))
    targets64 = tuple(t.double() if isinstance(t, torch.Tensor) else t for t in targets)
    dense = DenseKernels()
    st64 = dense.clip_stats(x.double(), y.double(), s.double(), pos)
    for kernels in (TritonKernels(), TritonKernels(TILED)):
        st = kernels.clip_stats(x, y, s, pos)
        # The log-sum-exps come back in float64 (rounded once; see clip_stats), as from the torch backend.
        assert st.row_lse.dtype == st.col_lse.dtype == torch.float64
        assert st.row_lse.shape == (b,) and st.col_lse.shape == (n,)
        assert rel(st.row_lse, st64.row_lse) < 1e-6 and rel(st.col_lse, st64.col_lse) < 1e-6
        if pos is None:
            assert st.row_pos is None and st.col_pos is None
        else:
            assert rel(st.row_pos, st64.row_pos) < 1e-6 and rel(st.col_pos, st64.col_pos) < 1e-6
        got = kernels.clip_grads(x, y, s, st.row_lse, st.col_lse, weight=0.3, pos=pos, targets=targets)
        want = dense.clip_grads(x.double(), y.double(), s.double(), st64.row_lse, st64.col_lse, weight=0.3, pos=pos,
                                targets=targets64)
        for o, w in zip(got, want):
            assert o.dtype == torch.float32 and rel(o, w) < 1e-5
        got = kernels.siglip_block(x, y, s, beta, weight=0.7, pos=pos, grads=True)
        want = dense.siglip_block(x.double(), y.double(), s.double(), beta.double(), weight=0.7, pos=pos, grads=True)
        for o, w in zip(got, want):
            assert o.dtype == torch.float32 and rel(o, w) < 1e-5
        loss_only = kernels.siglip_block(x, y, s, beta, weight=0.7, pos=pos, grads=False)
        assert loss_only[1:] == (None, None, None)
        assert torch.equal(loss_only[0], got[0])


@pytest.mark.parametrize("kind,directions", [("clip", "both"), ("clip", "image_to_text"), ("clip", "text_to_image"),
                                             ("siglip", "both")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["index", "ids"])
def test_ids_rectangles_and_directions(kind, directions, dtype, with_ids):
    """70 images, 101 texts (hard negatives after the positives), several partial super-blocks."""
    x, _ = features(70, 19, torch.float64, seed=21)
    y, _ = features(101, 19, torch.float64, seed=22)
    y[:70] = F.normalize(0.6 * x + 0.8 * y[:70], dim=-1)
    x, y = x.to(dtype), y.to(dtype)
    g = torch.Generator().manual_seed(3)
    ids = (torch.randint(0, 30, (70,), generator=g).to(DEVICE), torch.randint(0, 30, (101,), generator=g).to(DEVICE)) \
        if with_ids else None
    kw = {} if ids is None else dict(image_ids=ids[0], text_ids=ids[1])
    s = torch.tensor(20.0, device=DEVICE)
    if kind == "clip":
        check_against_reference("clip", lambda *a: tiled("clip")(*a, directions=directions, **kw), x, y, s,
                                ids=ids, directions=directions)
    else:
        check_against_reference("siglip", lambda *a: tiled("siglip")(*a, **kw), x, y, s,
                                torch.tensor(-6.0, device=DEVICE), ids=ids)


def test_strided_features():
    """Blocks that are views (transposed storage, row slices) give the same results as contiguous ones."""
    x, y = features(37, 17, torch.float32, seed=9)
    xt = x.T.contiguous().T  # stride (1, 37)
    yt = torch.cat([y, y]).T.contiguous().T[5:42]  # a row slice of transposed storage
    yt.copy_(y)
    s, beta = torch.tensor(12.0, device=DEVICE), torch.tensor(-4.0, device=DEVICE)
    kernels = TritonKernels(TILED)
    assert xt.stride() == (1, 37) and not yt.is_contiguous()
    pos = Positives.index(0, 37, 37, 37)
    for got, want in [(kernels.clip_stats(xt, yt, s, pos), kernels.clip_stats(x, y, s, pos)),
                      (kernels.siglip_block(xt, yt, s, beta, weight=1.0, pos=pos, grads=True),
                       kernels.siglip_block(x, y, s, beta, weight=1.0, pos=pos, grads=True))]:
        for o, w in zip(got, want):
            assert torch.allclose(o, w, rtol=1e-5, atol=1e-6)


def test_forward_only_runs_no_gradient_kernels(monkeypatch):
    x, y = features(37, 17, torch.float32, seed=3)
    s, beta = torch.tensor(10.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)
    want_clip = mb.clip_loss(x, y, s, backend="triton", strategy="local")
    want_sig = mb.siglip_loss(x, y, s, beta, backend="triton", strategy="local")
    real = TritonKernels.siglip_block

    def clip_grads(*args, **kwargs):
        raise AssertionError("clip_grads ran in a forward-only call")

    def siglip_block(self, *args, grads, **kwargs):
        assert not grads, "siglip_block computed gradients in a forward-only call"
        return real(self, *args, grads=grads, **kwargs)

    monkeypatch.setattr(TritonKernels, "clip_grads", clip_grads)
    monkeypatch.setattr(TritonKernels, "siglip_block", siglip_block)
    with torch.no_grad():
        assert torch.allclose(mb.clip_loss(x, y, s, backend="triton", strategy="local"), want_clip)
        assert torch.allclose(mb.siglip_loss(x, y, s, beta, backend="triton", strategy="local"), want_sig)
    assert abs(want_clip.item() - clip_loss_reference(x, y, s).item()) < 1e-5 * (1 + abs(want_clip.item()))


def test_float64_is_delegated_to_torch():
    x, y = features(7, 5, torch.float64, seed=1)
    s, beta = torch.tensor(4.0, dtype=torch.float64, device=DEVICE), torch.tensor(-2.0, dtype=torch.float64, device=DEVICE)
    out = TritonKernels().siglip_block(x, y, s, beta, weight=1 / 7, pos=Positives.index(0, 7, 7, 7), grads=True)
    assert all(t.dtype == torch.float64 for t in out)
    assert torch.allclose(out[0], siglip_loss_reference(x, y, s, beta), rtol=1e-12)
    r = TritonKernels().clip_stats(x, y, s, None).row_lse
    assert r.dtype == torch.float64 and torch.allclose(r, torch.logsumexp(s * x @ y.T, 1), rtol=1e-12)


def test_supports_and_config_validation():
    kernels = TritonKernels()
    assert kernels.name == "triton"
    assert kernels.supports(torch.device("cuda")) is True
    assert kernels.supports(torch.device("meta")) is False
    if not CUDA:
        assert kernels.supports(torch.device("cpu")) is True  # through the interpreter
        assert mb.kernels.get_backend("triton", torch.device("cpu")).name == "triton"
    with pytest.raises(ValueError, match="block_m"):
        TritonConfig(block_m=48)
    with pytest.raises(ValueError, match="grad_gemm"):
        TritonConfig(grad_gemm="cutlass")
    with pytest.raises(ValueError, match="super_rows"):
        TritonConfig(super_rows=100)
    with pytest.raises(ValueError, match="max_regs"):
        TritonConfig(max_regs=512)


def test_register_cap_gives_the_same_results():
    """max_regs is a launch option (ptxas .maxnreg): on the GPU it may spill, never change a result;
    the interpreter ignores it. Either way the answers equal the uncapped kernels'."""
    x, y = features(70, 19, torch.float32, seed=4)
    s, beta = torch.tensor(25.0, device=DEVICE), torch.tensor(-9.0, device=DEVICE)
    capped = TritonKernels(dataclasses.replace(TILED, max_regs=128))
    pos = Positives.index(0, 70, 70, 70)
    for got, want in [(capped.siglip_block(x, y, s, beta, weight=1.0, pos=pos, grads=True),
                       TritonKernels(TILED).siglip_block(x, y, s, beta, weight=1.0, pos=pos, grads=True)),
                      (capped.clip_stats(x, y, s, pos), TritonKernels(TILED).clip_stats(x, y, s, pos))]:
        for o, w in zip(got, want):
            assert torch.equal(o, w)


@needs_gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("b,d", [(130, 17), (300, 129)])
def test_gpu_bfloat16(kind, b, d):
    x, y = features(b, d, torch.bfloat16, seed=11)
    check(kind, x, y, [30.0] if kind == "clip" else [30.0, -10.0], public(kind))


@needs_gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_cublas_gradient_gemms(kind, dtype):
    x, y = features(300, 129, dtype, seed=13)
    config = TritonConfig(64, 64, 32, 64, 64, 32, 128, 128, num_warps=4, num_stages=2, grad_gemm="cublas")
    check(kind, x, y, [30.0] if kind == "clip" else [30.0, -10.0], tiled(kind, config))
