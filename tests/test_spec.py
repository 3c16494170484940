"""Contract: one loss spec, checked once (megabatch.spec). Every front -- clip_loss / siglip_loss,
ClipLoss / SigLipLoss, GradCache, integrations.hf's ContrastiveLoss, integrations.sentence_transformers'
MegabatchLoss -- refuses the same bad strategy, backend or micro-batch size with the same error type
and words (naming the argument as the user wrote it), and takes a configured backend instance as
clip_loss does. In one process, small shapes."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import megabatch as mb
from megabatch.kernels import TorchChunkedKernels


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 4, generator=g, dtype=torch.float64))


def _hf(**kw: Any) -> Any:
    from megabatch.integrations import hf

    return hf.ContrastiveLoss(**kw)


def _st(**kw: Any) -> Any:
    from megabatch.integrations.sentence_transformers import MegabatchLoss

    if "micro_batch_size" in kw:
        kw["mini_batch_size"] = kw.pop("micro_batch_size")  # ST's name for it (CachedMNRL's)
    return MegabatchLoss(nn.Identity(), **kw)


def _call(fn: Callable[..., torch.Tensor], bias: bool) -> Callable[..., Any]:
    x, y = _xy()
    return lambda **kw: fn(x, y, 10.0, -2.0, **kw) if bias else fn(x, y, 10.0, **kw)


# Each front with the settings keywords (strategy=, backend=, ranks_per_node=): where it raises.
FRONTS: dict[str, Callable[..., Any]] = {
    "clip_loss": _call(mb.clip_loss, False),
    "siglip_loss": _call(mb.siglip_loss, True),
    "ClipLoss": lambda **kw: mb.ClipLoss(**kw),
    "SigLipLoss": lambda **kw: mb.SigLipLoss(**kw),
    "hf.ContrastiveLoss": _hf,
    "MegabatchLoss": _st,
}
# And those taking a micro-batch size (the argument's name in the message is the front's own).
MICRO: dict[str, tuple[str, Callable[..., Any]]] = {
    "GradCache": ("micro_batch_size", lambda **kw: mb.GradCache(nn.Identity(), nn.Identity(), mb.clip_loss,
                                                                kw["micro_batch_size"])),
    "hf.ContrastiveLoss": ("micro_batch_size", _hf),
    "MegabatchLoss": ("mini_batch_size", _st),
}

BAD_SETTINGS = [
    (dict(strategy="tree"), ValueError, "strategy must be one of ('auto', 'local', 'gather', 'ring', 'hierarchical'), "
                                        "got 'tree'"),
    (dict(strategy=3), ValueError, "strategy must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'dense'), got 'cuda'"),
    (dict(backend=object()), ValueError, "backend must be one of"),
    (dict(ranks_per_node=2), ValueError, "ranks_per_node is only for strategy='hierarchical', got strategy="),
    (dict(strategy="local", ranks_per_node=2), ValueError,
     "ranks_per_node is only for strategy='hierarchical', got strategy='local'"),
]
BAD_MICRO = [(0, ValueError, "must be {} a positive int, got 0"), (-3, ValueError, "got -3"),
             (2.0, TypeError, "got float"), (True, TypeError, "got bool")]


def _raised(fn: Callable[[], Any]) -> tuple[type, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares type and message across fronts
        return type(e), str(e)
    raise AssertionError("no error raised")


def test_every_front_refuses_the_same_mistake_alike():
    for kw, exc, words in BAD_SETTINGS:
        for front, make in FRONTS.items():
            kind, msg = _raised(lambda: make(**kw))
            assert kind is exc and words in msg, f"{front}({kw}): {kind.__name__}: {msg}"
    for value, exc, words in BAD_MICRO:
        for front, (name, make) in MICRO.items():
            kind, msg = _raised(lambda: make(micro_batch_size=value))
            want = words.format("None or" if front != "GradCache" else "").replace("  ", " ")
            assert kind is exc and msg.startswith(name) and want in msg, f"{front}({name}={value!r}): {msg}"
    # memory_budget (auto's): make_spec's check, at the call (for the modules: their first call)
    x, y = _xy()
    for fn in (lambda: mb.clip_loss(x, y, 10.0, memory_budget=0),
               lambda: mb.SigLipLoss(memory_budget=-1)(x, y, 1.0, 0.0),
               lambda: mb.ClipLoss(memory_budget=2.5)(x, y, 10.0)):
        kind, msg = _raised(fn)
        assert kind is ValueError and "memory_budget must be a positive number of bytes" in msg, msg


def test_modules_take_a_configured_backend_as_the_functions_do():
    x, y = _xy()
    for module, fn, scalars in ((mb.ClipLoss, mb.clip_loss, (10.0,)), (mb.SigLipLoss, mb.siglip_loss, (10.0, -2.0))):
        kernels = TorchChunkedKernels(tile_elements=8)  # configured: tiles of 8 logits, several per call
        want = fn(x, y, *scalars, backend=kernels)
        (gx_want,) = torch.autograd.grad(want, x)
        got = module(backend=kernels)(x, y, *scalars)
        (gx,) = torch.autograd.grad(got, x)
        assert torch.equal(got, want) and torch.equal(gx, gx_want)
        assert torch.allclose(got, fn(x, y, *scalars, backend="torch"), rtol=1e-12, atol=0)
