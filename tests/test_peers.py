"""Contract: every benchmark peer adapter computes megabatch's loss (docs/design.md conventions: the scale is
the multiplier, CLIP averages both directions, SigLIP sums pairs / B) and its true gradients, checked
against the float64 reference for the loss and every gradient the peer provides.

The peers are optional packages (CI installs none of them): a peer that is not installed is skipped
with that reason. On CUDA every installed peer runs for real (fp32 and bf16). Without CUDA:
  - plain and open_clip run on CPU for real;
  - memeff and siglip_kernel run their real Triton kernels through Triton's interpreter
    (TRITON_INTERPRET=1, set by conftest.py) with only their CUDA-only queries stubbed
    (torch.cuda.get_device_capability/get_device_properties as an sm_90 GPU, memeff's CUDA-tensor
    check): the `_interpreted` tests;
  - inf_cl cannot run at all (it asserts q.is_cuda, and its backward kernels use PTX inline asm,
    which the interpreter does not implement): `test_inf_cl_glue_with_dense_lse` runs its Python
    code (scale, head_dim view, numerator, mean, the adapter's two directions) with the kernel's
    log-sum-exp replaced by a dense one, which checks the adapter's conventions but not the kernels.
"""
from __future__ import annotations

import importlib.util
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

import megabatch as mb
from megabatch.bench import peers

from _tolerance import FLOOR, _scalar_conditions, plain_clip, plain_siglip, rel_err

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not CUDA
CASES = [(p, loss) for p in peers.PEERS for loss in peers.PEERS[p]]


def _require(peer: str) -> None:
    if peer in peers._MODULES and not peers._installed(peer):
        pip = {"open_clip": "open-clip-torch"}.get(peer, peer.replace("_", "-"))
        pytest.skip(f"{peer} is not installed (optional benchmark peer: pip install {pip})")


def _inputs(batch: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    # mix in some positives so the loss is not at its random-pair value
    y = F.normalize(y + 0.5 * x, dim=-1)
    s = torch.tensor(10.0, device=device)
    b = torch.tensor(-10.0, device=device)
    return x.to(device, dtype), y.to(device, dtype), s, b


def check_peer(peer: str, kind: str, fn, x, y, s, b, *, extra: float = 0.0) -> dict[str, float]:
    """Loss and every gradient of fn against the float64 reference; relative errors, scalar gradients
    relative to the size of their terms (as in _tolerance). The bound is the repo's rule (dtype floor
    plus 2x plain PyTorch's error in the inputs' dtype) plus `extra` (tf32 kernels on CUDA).
    A gradient the peer cannot give (NO_SCALE_GRAD) must be absent, not wrong."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, s, b)]
    loss = fn(*leaves)
    loss.backward()
    out = [loss.detach()] + [t.grad for t in leaves]

    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, y, s, b)]
    ref = mb.clip_loss_reference(*ref_leaves[:3]) if kind == "clip" else mb.siglip_loss_reference(*ref_leaves)
    ref.backward()
    refs = [ref.detach()] + [t.grad for t in ref_leaves]

    plain_leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, s, b)]
    plain = plain_clip(*plain_leaves[:3]) if kind == "clip" else plain_siglip(*plain_leaves)
    plain.backward()
    plains = [plain.detach()] + [t.grad for t in plain_leaves]

    conditions = _scalar_conditions(kind, [t.cpu() for t in (x, y, s, b)], None, "both")
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    errors = {}
    for k, name in enumerate(names):
        if kind == "clip" and name == "d_bias":
            assert out[k] is None, f"{peer} clip: a gradient reached the bias"
            continue
        if name == "d_scale" and peer in peers.NO_SCALE_GRAD:
            assert out[k] is None, f"{peer} is documented as giving no scale gradient, but gave one"
            continue
        assert out[k] is not None, f"{peer} {kind}: no {name}"
        assert out[k].shape == refs[k].shape, f"{peer} {kind} {name}: shape {tuple(out[k].shape)}"
        denom = max(float(refs[k].abs()), conditions[k - 3]) if k >= 3 else None
        err = rel_err(out[k].cpu(), refs[k].cpu(), denom)
        plain_err = rel_err(plains[k].cpu(), refs[k].cpu(), denom)
        bound = FLOOR[x.dtype] + 2 * plain_err + extra
        if k == 0 and kind == "clip":  # loss assembled from log-sum-exps: a few ulps of the logits
            max_logit = float(s.double().abs() * x.double().norm(dim=1).max() * y.double().norm(dim=1).max())
            bound += 4 * torch.finfo(torch.float32).eps * max_logit / max(float(refs[0].abs()), 1e-30)
        assert err <= bound, f"{peer} {kind} {name}: error {err:.3e} > bound {bound:.3e} (plain {plain_err:.3e})"
        errors[name] = err
    return errors


# ---- every installed peer, for real, where it can run --------------------------------------------------------


@pytest.mark.parametrize("peer,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peer_matches_reference(peer, kind, dtype):
    _require(peer)
    if not CUDA:
        if peer in peers.CUDA_ONLY:
            pytest.skip(f"{peer} runs on CUDA only and there is no GPU here (see the _interpreted tests)")
    device = "cuda" if CUDA else "cpu"
    # B not a multiple of any tile; D a multiple of 128 (inf_cl's head_dim, memeff's FA path)
    x, y, s, b = _inputs(300 if CUDA else 64, 128 if CUDA else 32, dtype, device)
    # tf32 dots in inf_cl, memeff and siglip_kernel's fp32 kernel: ~2^-11 relative per product
    extra = 5e-3 if (CUDA and dtype == torch.float32 and peer != "plain") else 0.0
    check_peer(peer, kind, peers.get(peer, kind), x, y, s, b, extra=extra)


def test_available_lists_installed_peers_that_can_run():
    cpu = peers.available("cpu")
    assert cpu[0] == "plain" and not set(cpu) & peers.CUDA_ONLY
    for p in peers.PEERS:
        assert (p in cpu) == (peers._installed(p) and p not in peers.CUDA_ONLY)
    if not CUDA:
        assert peers.available() == cpu
        for p in peers.CUDA_ONLY:
            with pytest.raises(RuntimeError, match="CUDA"):
                peers.get(p, peers.PEERS[p][0])


# ---- CUDA-only peers on CPU: the real Triton kernels in the interpreter, CUDA queries stubbed -------------------

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU-only check through TRITON_INTERPRET=1 (on CUDA the real test covers the peer)"
)


@pytest.fixture
def fake_sm90(monkeypatch):
    """What memeff and siglip_kernel ask torch.cuda about (tile tables, SM count), answered as an H100."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    props = types.SimpleNamespace(multi_processor_count=132, shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)


@needs_interpreter
@pytest.mark.parametrize("backward", ["flash", "atomic"])
def test_memeff_interpreted(fake_sm90, monkeypatch, backward):
    _require("memeff")
    import memeff.clip_loss

    monkeypatch.setattr(memeff.clip_loss, "_validate_features", lambda x, y: None)  # "must be CUDA tensors"
    monkeypatch.setattr(memeff.clip_loss, "_FORCE_FA", backward == "flash")  # memeff's own test hook
    fn = peers._BUILDERS["memeff"]("clip")
    for batch, dim in ((64, 32), (50, 64)):
        check_peer("memeff", "clip", fn, *_inputs(batch, dim, torch.float32, "cpu"))


@needs_interpreter
def test_memeff_default_stable_rescales_gradients(fake_sm90, monkeypatch):
    """Why the adapter passes stable=False: memeff's default scales the feature gradients by
    sqrt(B * temperature) (same loss value)."""
    _require("memeff")
    import memeff
    import memeff.clip_loss

    monkeypatch.setattr(memeff.clip_loss, "_validate_features", lambda x, y: None)
    x, y, s, _ = _inputs(64, 32, torch.float32, "cpu")
    grads = []
    for stable in (False, True):
        xs = x.clone().requires_grad_(True)
        loss_fn = memeff.MemoryEfficientCLIPLoss(temperature=1 / float(s), normalized_inputs=True, stable=stable)
        loss_fn(xs, y).backward()
        grads.append(xs.grad)
    ratio = float(grads[1].norm() / grads[0].norm())
    assert math.isclose(ratio, math.sqrt(64 / float(s)), rel_tol=1e-4)


@needs_interpreter
def test_siglip_kernel_interpreted(fake_sm90):
    """fp32 takes the sm_90 persistent fused kernel; the chunked path (bf16 on GPU) is run in fp32
    here, since the interpreter's bf16 is not trustworthy."""
    _require("siglip_kernel")
    fn = peers._BUILDERS["siglip_kernel"]("siglip")
    check_peer("siglip_kernel", "siglip", fn, *_inputs(64, 32, torch.float32, "cpu"))
    check_peer("siglip_kernel", "siglip", fn, *_inputs(50, 48, torch.float32, "cpu"))
    from siglip_kernel import fused_siglip_loss

    chunked = lambda x, y, s, b: fused_siglip_loss(x, y, torch.log(s), b, backend="chunked_bf16")  # noqa: E731
    check_peer("siglip_kernel", "siglip", chunked, *_inputs(64, 32, torch.float32, "cpu"))


def test_inf_cl_glue_with_dense_lse(monkeypatch):
    """inf_cl's kernels cannot run without CUDA; its Python glue can. The kernel's log-sum-exp
    (FlashProb: lse_i over j of q_i.k_j, summed over heads) is replaced by a dense one."""
    _require("inf_cl")
    import inf_cl.flash

    def dense_lse(q, k):  # q, k: (B, heads, head_dim)
        return torch.logsumexp(torch.einsum("mhd,nhd->mn", q, k), dim=1)

    monkeypatch.setattr(inf_cl.flash, "FlashProb", types.SimpleNamespace(apply=dense_lse))
    fn = peers._BUILDERS["inf_cl"]("clip")
    for dim in (256, 96):  # head_dim 256 (inf_cl's default), then 32
        check_peer("inf_cl", "clip", fn, *_inputs(64, dim, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="multiple of 16"):
        fn(*_inputs(8, 24, torch.float32, "cpu"))


def test_inf_cl_scale_argument_needs_a_process_group():
    """Why the adapter multiplies the scale in itself: inf_cl's scale= path wraps the scale in
    GradientGather, whose backward all-reduces (W x the gradient under DDP; an error without a group)."""
    _require("inf_cl")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists in this process")
    from inf_cl.ring import GradientGather

    s = torch.tensor(10.0, requires_grad=True)
    with pytest.raises((ValueError, RuntimeError), match="process group"):
        GradientGather.apply(s).backward()


def test_open_clip_loads_without_its_package_init():
    """open_clip's __init__ needs torchvision, ftfy, regex, tqdm; the adapter loads only loss.py."""
    _require("open_clip")
    m = peers._open_clip_loss()
    assert hasattr(m, "ClipLoss") and hasattr(m, "SigLipLoss")
    assert importlib.util.find_spec("open_clip") is not None
