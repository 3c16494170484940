"""GradCache: exact gradients of a contrastive loss whose encoder activations do not fit in memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". For a
loss L(F, G, *args) of the features F = f(X), G = g(Y) of per-example encoders f, g:

  1. run f and g over micro-batches without a graph (recording each call's RNG state),
  2. make the concatenated (B, D) features leaves, compute L once for the whole batch (any backend,
     any strategy: under torchrun the loss does the cross-rank part) and back-propagate it, which
     gives dL/dF, dL/dG and the loss arguments' gradients (e.g. logit_scale.exp()),
  3. re-run each micro-batch with a graph, replaying its RNG state (dropout, stochastic depth), and
     back-propagate <dL/dF_k, f(X_k)> + <dL/dG_k, g(Y_k)>. By the chain rule these sum to exactly
     the full-batch dL/dtheta; the loss arguments' own graph is back-propagated once, with the last
     micro-batch.

Memory: one micro-batch's activations plus the features and their gradients (O(B * D)). Cost: each
encoder runs forward twice and backward once. Exact only for per-example encoders: batch norm
(statistics over the micro-batch) computes a different function, and its running statistics are
updated by both passes. A frozen tower (its output needs no gradient) is re-run only once.

Distributed (DDP): gradients are all-reduced once per call, after the last micro-batch; every
earlier backward runs under `no_sync()`. DDP synchronises only when its own forward runs, so
  - an encoder that *is* a DistributedDataParallel wrapper is called as usual;
  - encoders that are methods of the wrapped model (`ddp.module.encode_image`) need the wrapper in
    `modules=`: GradCache then runs the last micro-batch of both towers inside the wrapper's forward
    (by setting the inner module's `forward` for that one call), so DDP prepares its reducer.
Parameters the loss uses (logit_scale, logit_bias) must reach it through `loss_args`; their graph is
back-propagated in the synchronised backward, so DDP averages their gradients too when they live in
a wrapped module. RNG replay covers the CPU generator and the CUDA generators of the devices in use.

Distributed (FSDP2, `fully_shard`): give the sharded root module in `modules=` (or use its methods as
encoders; register them with `register_fsdp_forward_method` so its own parameters are gathered).
Every encoder call all-gathers parameters, so every rank must make the same calls: GradCache agrees
on the number of micro-batches with one all_reduce (MAX over the default group) and a rank with
fewer (uneven batches) or a tower with fewer (N > B) re-runs its first micro-batch in their place,
output discarded in the no-grad pass and back-propagated with a zero gradient. Every backward but
the last runs with `set_requires_gradient_sync(False)` (unsharded gradients accumulate locally, as
DDP's no_sync); the last reduce-scatters once. Loss arguments must be computed from gathered
parameters (after `module.unshard()`, or inside a forward), not from sharded DTensors.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ._fsdp import is_dtensor, is_fsdp
from . import _microbatch as micro
from ._microbatch import Batch, Encoder


class GradCache:
    """Full-batch gradients of ``loss_fn(image_encoder(images), text_encoder(texts), *loss_args)``
    with encoder activations for only ``micro_batch_size`` examples at a time.

        gc = mb.GradCache(model.encode_image, model.encode_text, mb.clip_loss, micro_batch_size=256)
        loss = gc(images, texts, model.logit_scale.exp())    # .grad is filled; then optimizer.step()

    Args:
        image_encoder, text_encoder: callables (nn.Module or e.g. a bound ``encode_image``) mapping a
            micro-batch to (b_k, D) features. A tensor batch is passed as ``enc(chunk)``, a mapping as
            ``enc(**chunk)`` (token ids + attention mask), a tuple/list as ``enc(*chunk)``.
        loss_fn: ``loss_fn(image_features (B, D), text_features (N, D), *loss_args) -> 0-dim loss``,
            e.g. ``mb.clip_loss``, ``mb.siglip_loss`` or a ``ClipLoss``/``SigLipLoss`` module (called
            with ``image_ids=``/``text_ids=`` keywords too when the call gives them).
        micro_batch_size: examples per encoder call (a positive int; need not divide the batch).
        modules: nn.Module(s) owning the encoders' parameters, for DDP: list any
            DistributedDataParallel wrapper whose forward the encoders do not call themselves;
            for FSDP2: the ``fully_shard``-ed root module(s) (see the module docstring).
    """

    def __init__(
        self,
        image_encoder: Encoder,
        text_encoder: Encoder,
        loss_fn: Callable[..., Tensor],
        micro_batch_size: int,
        *,
        modules: Optional[Union[nn.Module, Iterable[nn.Module]]] = None,
    ):
        for name, fn in (("image_encoder", image_encoder), ("text_encoder", text_encoder), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        micro.check_size("micro_batch_size", micro_batch_size)
        modules = () if modules is None else (modules,) if isinstance(modules, nn.Module) else tuple(modules)
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules must hold nn.Module objects, got {type(m).__name__}")
        self.image_encoder, self.text_encoder, self.loss_fn = image_encoder, text_encoder, loss_fn
        self.micro_batch_size = micro_batch_size
        # DDP wrappers the encoders call (an encoder that is one, or one's bound method) ...
        owners = [getattr(e, "__self__", e) for e in (image_encoder, text_encoder)]
        self._called = _unique([o for o in owners if isinstance(o, DDP)])
        # ... and those GradCache must run the last micro-batch through.
        self._driven = _unique([m for m in modules if isinstance(m, DDP) and all(m is not c for c in self._called)])
        # FSDP2 roots: every rank runs the same encoder calls, and only the last backward syncs.
        self._fsdp = _unique([m for m in (*modules, *owners) if is_fsdp(m)])
        self._warned = False

    def __repr__(self) -> str:
        wrappers = len(self._called) + len(self._driven)
        fsdp = f", fsdp_modules={len(self._fsdp)}" if self._fsdp else ""
        return f"GradCache(micro_batch_size={self.micro_batch_size}, ddp_wrappers={wrappers}{fsdp})"

    def __call__(self, images: Batch, texts: Batch, *loss_args: Any, image_ids: Optional[Tensor] = None,
                 text_ids: Optional[Tensor] = None) -> Tensor:
        """Return the (detached) loss; accumulate dL/dtheta into every parameter's ``.grad``.

        Args:
            images: (B, ...) tensor, or a mapping/tuple of tensors all with B rows.
            texts: (N, ...) likewise; N may exceed B (hard negatives after the positives).
            *loss_args: passed to loss_fn after the features (e.g. ``logit_scale.exp()``, bias).
            image_ids, text_ids: (B,) and (N,) int64, passed on to loss_fn as keywords when given
                (positives by ids: see megabatch.clip_loss).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("GradCache computes gradients: call it with grad enabled (for eval, call the encoders)")
        sizes = (micro.batch_size("images", images), micro.batch_size("texts", texts))
        id_kwargs = {k: v for k, v in (("image_ids", image_ids), ("text_ids", text_ids)) if v is not None}
        self._warn_if_unsynced()
        _check_loss_args(loss_args)
        mbs = self.micro_batch_size
        # Micro-batches per tower, right-aligned on a common schedule: the last step runs the last
        # micro-batch of both towers (the synchronised one under DDP).
        bounds = [[(a, min(a + mbs, size)) for a in range(0, size, mbs)] for size in sizes]
        steps = max(len(bounds[0]), len(bounds[1]))
        if self._fsdp:
            steps = _max_over_ranks(steps, images, texts)
        schedule = [[None] * (steps - len(bt)) + bt for bt in bounds]
        batches = (images, texts)
        chunks = [[None if ab is None else micro.slice_batch(batches[t], *ab) for ab in schedule[t]] for t in range(2)]
        # FSDP: a step without a micro-batch of a tower re-runs the tower's first one (a filler).
        fillers = [micro.slice_batch(batches[t], *bounds[t][0]) if self._fsdp else None for t in range(2)]
        devices = micro.cuda_devices(images, texts)
        autocast_state = micro.autocast_state()

        # 1. Features without a graph, recording the RNG state before every encoder call.
        states: list[list[Any]] = []
        parts: list[list[Tensor]] = [[], []]
        with torch.no_grad():
            for k in range(steps):
                states.append([])
                for t, (encoder, name) in enumerate(self._encoders()):
                    states[-1].append(micro.rng_state(devices))
                    ab = schedule[t][k]
                    if ab is not None:
                        parts[t].append(micro.encode(encoder, chunks[t][k], name, ab[1] - ab[0]))
                    elif fillers[t] is not None:
                        micro.encode(encoder, fillers[t], name, micro.rows(fillers[t]))

        # 2. The loss once for the whole batch, on leaf features (and leaf copies of the loss args).
        img, txt = (torch.cat(p).requires_grad_() for p in parts)
        del parts
        args = [a.detach().requires_grad_() if _needs_grad(a) else a for a in loss_args]
        loss = self.loss_fn(img, txt, *args, **id_kwargs)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a 0-dim tensor, got {type(loss).__name__}")
        if not loss.requires_grad:
            raise RuntimeError("loss_fn's result does not depend on the features (it has no grad_fn)")
        loss.backward()
        feature_grads = [f.grad if f.grad is not None else torch.zeros_like(f) for f in (img, txt)]
        arg_grads = [(a, c.grad) for a, c in zip(loss_args, args) if _needs_grad(a) and c.grad is not None]

        # 3. Re-run each micro-batch with a graph (replayed RNG, same autocast) and push its slice.
        with torch.random.fork_rng(devices=devices), micro.autocast_as(autocast_state):
            self._replay(chunks, schedule, states, devices, feature_grads, arg_grads, fillers)
        return loss.detach()

    def _encoders(self) -> tuple[tuple[Encoder, str], tuple[Encoder, str]]:
        return (self.image_encoder, "image_encoder"), (self.text_encoder, "text_encoder")

    def _replay(
        self,
        chunks: list[list[Optional[Batch]]],
        schedule: list[list[Optional[tuple[int, int]]]],
        states: list[list[Any]],
        devices: list[int],
        feature_grads: list[Tensor],
        arg_grads: list[tuple[Tensor, Tensor]],
        fillers: list[Optional[Batch]],
    ) -> None:
        # A tower whose output needs no gradient (frozen, LiT) is re-run once to find out, then skipped.
        rerun = [_trainable(self.image_encoder), _trainable(self.text_encoder)]

        def step(k: int, pair: tuple[Optional[Batch], Optional[Batch]],
                 *extra: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor]]:
            outs: list[Tensor] = []
            grads: list[Tensor] = []
            for t, (encoder, name) in enumerate(self._encoders()):
                ab = schedule[t][k]
                if rerun[t] and ab is not None:
                    micro.set_rng_state(states[k][t], devices)
                    out = micro.encode(encoder, pair[t], name, ab[1] - ab[0])
                    rerun[t] = out.requires_grad
                    outs.append(out)
                    grads.append(feature_grads[t][ab[0]:ab[1]])
                elif rerun[t] and fillers[t] is not None:  # FSDP: the same collectives as the other ranks
                    out = micro.encode(encoder, fillers[t], name, micro.rows(fillers[t]))
                    rerun[t] = out.requires_grad
                    outs.append(out)
                    grads.append(torch.zeros_like(out))
            return (*outs, *extra), grads

        last = len(schedule[0]) - 1
        for k in range(last):
            with self._no_sync():
                _backward(*step(k, (chunks[0][k], chunks[1][k])))
        # The loss args' graph goes with the last, synchronised backward. A parameter passed as is
        # has no grad_fn and DDP's unused-parameter search (from the forward's outputs) would miss it.
        extra = [a if a.grad_fn is not None else a.view_as(a) for a, _ in arg_grads]
        outs, grads = _through_ddp(self._driven, functools.partial(step, last), (chunks[0][last], chunks[1][last]),
                                   *extra)
        _backward(outs, grads + [g for _, g in arg_grads])

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for ddp in self._called + self._driven:
                stack.enter_context(ddp.no_sync())
            for m in self._fsdp:
                m.set_requires_gradient_sync(False)
                stack.callback(m.set_requires_gradient_sync, True)
            yield

    def _warn_if_unsynced(self) -> None:
        if self._warned or self._called or self._driven or self._fsdp:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._warned = True
            warnings.warn(
                "GradCache: torch.distributed is initialised but no DistributedDataParallel wrapper or "
                "fully_shard-ed module was given (as an encoder or in modules=); parameter gradients will not "
                "be averaged across ranks",
                stacklevel=3,
            )


def _unique(items: list[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in items:
        if all(m is not o for o in out):
            out.append(m)
    return out


def _check_loss_args(loss_args: Sequence[Any]) -> None:
    for i, a in enumerate(loss_args):
        if is_dtensor(a):
            raise TypeError(
                f"loss_args[{i}] is a DTensor (a sharded FSDP parameter, or computed from one): compute it "
                "from gathered parameters, e.g. after module.unshard() or inside a forward"
            )


def _max_over_ranks(steps: int, *batches: Batch) -> int:
    """The largest number of micro-batch steps of any rank (one all_reduce; FSDP needs them equal)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return steps
    device = next((t.device for b in batches for t in micro.leaves(b)), torch.device("cpu"))
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([steps], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _needs_grad(a: Any) -> bool:
    return isinstance(a, Tensor) and a.requires_grad


def _trainable(encoder: Encoder) -> bool:
    """False only for a module (or a module's method) none of whose parameters needs a gradient."""
    owner = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
    if not isinstance(owner, nn.Module):
        return True
    return any(p.requires_grad for p in owner.parameters())


def _backward(outs: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _through_ddp(wrappers: Sequence[DDP], step: Callable[..., tuple], *inputs: Any) -> tuple:
    """Run ``step(*inputs)`` inside the forward of every wrapper (nested), so each DDP prepares its
    reducer for the backward that follows. The inner module's ``forward`` is replaced for that call."""
    if not wrappers:
        return step(*inputs)
    ddp, rest = wrappers[0], wrappers[1:]
    inner = ddp.module
    active = False
    box: list[list[Tensor]] = []

    def forward(*args: Any) -> tuple:
        nonlocal active
        if active:
            raise RuntimeError(
                "an encoder called the DistributedDataParallel wrapper given in modules= itself: pass "
                "the wrapper as the encoder, or its .module's methods as encoders"
            )
        active = True
        outs, grads = _through_ddp(rest, step, *args)
        box.append(grads)
        return outs

    with swapped_forward(inner, forward):
        outs = ddp(*inputs)
    return tuple(outs), box[0]


@contextlib.contextmanager
def swapped_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """`module.forward` is `forward` inside the block (an instance attribute shadows the class's),
    so that calling the module's wrapper (DDP, FSDP2) runs `forward` with the wrapper's hooks; an
    instance forward already there (e.g. accelerate's autocast wrapper) comes back afterwards.
    GradCache's last micro-batch and megabatch.integrations.hf's feature calls both go through it."""
    saved = module.__dict__.get("forward", None)
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved
