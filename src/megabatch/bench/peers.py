"""Adapters that run other implementations under megabatch's benchmark signature.

Each adapter is `(image_features, text_features, logit_scale, logit_bias) -> loss`, with
logit_scale the multiplier (megabatch's convention) and the loss normalised as in docs/design.md, so
timings compare like with like: CLIP is the mean of the image->text and text->image cross-entropies
of s * x @ y.T; SigLIP is -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)). The gradients of the
features, the scale and the bias are the true gradients of that loss, except where a peer cannot
give one (memeff: fixed temperature, no scale gradient; see NO_SCALE_GRAD). tests/test_peers.py
checks every adapter whose package is installed against megabatch.reference.

"plain" is always available: the open_clip computation (the dense B x B matrix in the inputs'
dtype, F.cross_entropy / F.logsigmoid, autograd). The others are used only when their package is
installed (they are optional benchmark dependencies, never dependencies of the library);
`available(device)` lists what can run there. What each peer expects, read from its source:

  open_clip 3.3.0  open_clip/loss.py ClipLoss()(x, y, s) and SigLipLoss()(x, y, s, b): s is the
                   multiplier, CLIP the mean of both directions, SigLIP summed over pairs / B; plain
                   autograd, any device and dtype. loss.py imports only torch, so it is loaded by
                   file path: the package's __init__ needs torchvision, ftfy, regex, tqdm.
  inf_cl 1.2.1     cal_inf_loss(q, k, scale=None, head_dim=256) = mean_i(lse_j(q_i.k_j) - q_i.k_i)
                   with q = scale * q: one direction (rows) only, so the adapter averages
                   cal_inf_loss(s x, y) and cal_inf_loss(s y, x). The scale is multiplied in by the
                   adapter rather than passed as scale=: inf_cl wraps a scale tensor in
                   GradientGather, whose backward calls dist.all_reduce, so with a learnable scale
                   it fails without a process group (and sums the scale gradient over ranks in one:
                   W x too large); without a group the math is the same scale * q. Features are
                   computed in fp32 (tf32 dots, PTX `cvt.rna.tf32`), are viewed as
                   (B, D / head_dim, head_dim) with head_dim a power of two in 16..256: the adapter
                   uses 256 when it divides D (inf_cl's default) and otherwise the largest of
                   128, 64, 32, 16 that does. CUDA only (asserts q.is_cuda; the backward kernels
                   use PTX inline asm, which Triton's interpreter cannot run).
  memeff 0.3.1     MemoryEfficientCLIPLoss(temperature, normalized_inputs, stable)(x, y):
                   temperature is a Python float (1 / s), so the scale gets no gradient and the
                   adapter reads s to the host (one device sync per call). normalized_inputs=True
                   (the default L2-normalises the features inside, which changes the loss of
                   unnormalised inputs); stable=False (the default stable=True rescales the feature
                   gradients by sqrt(B * temperature): the loss value is the same, the gradients are
                   not the loss's). Mean of both directions (sum / 2B). Exponentials are shifted by
                   the scale, not a running max: it assumes |x_i.y_j| <= 1 (normalised features).
                   D >= 16 and, below 64, a power of two; x and y of one shape; tf32 dots
                   (MEMEFF_INPUT_PRECISION=ieee at import turns that off). CUDA only (rejects
                   non-CUDA tensors; its tile tables query torch.cuda.get_device_capability).
                   Its users report fp32 at D=512 failing on H100 with Triton
                   OutOfResources (shared memory); bf16 runs.
  siglip_kernel    fused_siglip_loss(x, y, log_temperature, bias): "temperature" is the
    0.1.2          multiplier (logits = x @ y.T * exp(log_temperature) + bias), so the adapter
                   passes log(s) and autograd carries the gradient to s; gradients for both
                   scalars. Summed over pairs / B. bf16/fp16 run the chunked cuBLAS + Triton path
                   (feature gradients accumulated in the input dtype, loss returned in it); fp32 on
                   sm_89+ runs a persistent fused kernel that reads s and b with .item() and asserts
                   contiguous features (the adapter passes .contiguous()). CUDA only: importing it
                   calls torch.cuda.get_device_capability (autotune configs at import time).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# peer -> losses it implements
PEERS: dict[str, tuple[str, ...]] = {
    "plain": ("clip", "siglip"),
    "open_clip": ("clip", "siglip"),
    "inf_cl": ("clip",),
    "memeff": ("clip",),  # logit_scale is fixed (a Python float): no gradient for it
    "siglip_kernel": ("siglip",),
}
_MODULES = {"open_clip": "open_clip", "inf_cl": "inf_cl", "memeff": "memeff", "siglip_kernel": "siglip_kernel"}
# peer -> the pip package that brings it (what a skipped peer's note says to install)
PACKAGES = {"open_clip": "open-clip-torch", "inf_cl": "inf-cl", "memeff": "memeff", "siglip_kernel": "siglip-kernel"}
# peers whose code runs on CUDA tensors only (see the module docstring for why)
CUDA_ONLY = frozenset({"inf_cl", "memeff", "siglip_kernel"})
# peers whose loss does not depend on logit_scale through autograd (it is read as a fixed number)
NO_SCALE_GRAD = frozenset({"memeff"})


def _installed(peer: str) -> bool:
    if peer not in _MODULES:
        return True
    try:
        spec = importlib.util.find_spec(_MODULES[peer])
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if peer == "open_clip":  # only loss.py is used
        return _open_clip_loss_path(spec) is not None
    return True


def available(device: Union[str, torch.device, None] = None) -> list[str]:
    """Peers whose package is installed and that can run on `device` (default: cuda if available,
    else cpu): the CUDA-only peers are left out on any other device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return [p for p in PEERS if _installed(p) and (on_cuda or p not in CUDA_ONLY)]


def skipped(device: Union[str, torch.device], losses: tuple[str, ...] = ("clip", "siglip")) -> dict[str, str]:
    """Why each peer that `megabatch bench --peers` does not run on `device` for `losses` is left out:
    peer -> "not installed (pip install PACKAGE)", "runs on CUDA only (--device cpu)" or "implements clip only"."""
    on = set(available(device))
    why: dict[str, str] = {}
    for peer, implemented in PEERS.items():
        if not _installed(peer):
            why[peer] = f"not installed (pip install {PACKAGES[peer]})"
        elif peer not in on:
            why[peer] = f"runs on CUDA only (--device {torch.device(device)})"
        elif not set(implemented) & set(losses):
            why[peer] = f"implements {' and '.join(implemented)} only (--loss {' '.join(losses)})"
    return why


def _plain_clip(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
    logits = s.to(x.dtype) * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _plain_siglip(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
    logits = s.to(x.dtype) * x @ y.T + b.to(x.dtype)
    z = 2 * torch.eye(x.shape[0], device=x.device, dtype=x.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _open_clip_loss_path(spec: "importlib.machinery.ModuleSpec") -> Optional[str]:
    for root in spec.submodule_search_locations or ():
        path = os.path.join(root, "loss.py")
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def _open_clip_loss() -> ModuleType:
    """open_clip/loss.py loaded on its own (it imports only torch), without open_clip/__init__."""
    spec = importlib.util.find_spec("open_clip")
    path = _open_clip_loss_path(spec) if spec is not None else None
    if path is None:
        raise ImportError("open_clip (open-clip-torch) is not installed")
    loss_spec = importlib.util.spec_from_file_location("megabatch._peer_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def _open_clip(loss: str) -> LossFn:
    m = _open_clip_loss()
    if loss == "clip":
        clip = m.ClipLoss()
        return lambda x, y, s, b: clip(x, y, s)
    siglip = m.SigLipLoss()
    return lambda x, y, s, b: siglip(x, y, s, b)


def _inf_cl_head_dim(dim: int) -> int:
    for h in (256, 128, 64, 32, 16):
        if dim % h == 0:
            return h
    raise ValueError(f"inf_cl needs the feature dimension to be a multiple of 16 (head_dim 16..256), got {dim}")


def _inf_cl(loss: str) -> LossFn:
    from inf_cl import cal_inf_loss

    def fn(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
        h = _inf_cl_head_dim(x.shape[1])
        # One direction per call (rows of (s x) @ y.T, mean over rows); CLIP averages both. The
        # scale is applied here, as inf_cl would (scale * q), not via scale=, whose
        # GradientGather all-reduces its gradient (an error without a process group).
        return (cal_inf_loss(s * x, y, head_dim=h) + cal_inf_loss(s * y, x, head_dim=h)) / 2

    return fn


def _memeff(loss: str) -> LossFn:
    from memeff import MemoryEfficientCLIPLoss

    def fn(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
        # temperature is a fixed Python float: no gradient reaches s (one host sync to read it).
        # stable=False: true feature gradients (stable=True scales them by sqrt(B * temperature)).
        # normalized_inputs=True: the loss of the features as given (no F.normalize inside).
        temperature = 1.0 / float(s.detach())
        return MemoryEfficientCLIPLoss(temperature=temperature, normalized_inputs=True, stable=False)(x, y)

    return fn


def _siglip_kernel(loss: str) -> LossFn:
    from siglip_kernel import fused_siglip_loss

    # siglip_kernel's log_temperature is the log of the multiplier: logits = x @ y.T * exp(.) + b.
    return lambda x, y, s, b: fused_siglip_loss(x.contiguous(), y.contiguous(), torch.log(s), b)


# peer -> (loss -> adapter), without the CUDA guard of get(); the tests use these directly to run
# the peers' Triton kernels in the interpreter with the CUDA-only queries stubbed out.
_BUILDERS: dict[str, Callable[[str], LossFn]] = {
    "open_clip": _open_clip,
    "inf_cl": _inf_cl,
    "memeff": _memeff,
    "siglip_kernel": _siglip_kernel,
}


def _cuda_only(peer: str, fn: LossFn) -> LossFn:
    def guarded(x: Tensor, y: Tensor, s: Tensor, b: Tensor) -> Tensor:
        if not x.is_cuda:
            raise RuntimeError(f"{peer} runs on CUDA tensors only, got {x.device}")
        return fn(x, y, s, b)

    return guarded


def get(peer: str, loss: str) -> LossFn:
    if peer not in PEERS or loss not in PEERS[peer]:
        raise ValueError(f"peer {peer!r} does not implement the {loss} loss (known: {PEERS})")
    if peer == "plain":
        return _plain_clip if loss == "clip" else _plain_siglip
    if peer in CUDA_ONLY:
        if not torch.cuda.is_available():
            raise RuntimeError(f"{peer} runs on CUDA only, and CUDA is not available here")
        return _cuda_only(peer, _BUILDERS[peer](loss))
    return _BUILDERS[peer](loss)
