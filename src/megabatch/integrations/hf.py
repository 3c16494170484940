"""Hugging Face dual encoders trained with megabatch's exact global loss.

Hugging Face's CLIPModel / SiglipModel compute their loss on the local b x b logits only (and keep
torch.distributed out of their modeling code). Here the same models get the global loss of
megabatch.clip_loss / siglip_loss, over every rank, without any b x b or B x B matrix:

    from megabatch.integrations import hf
    loss_fn = hf.ContrastiveLoss()                        # CLIP or SigLIP, from the model
    loss = loss_fn(model, batch)                          # batch: pixel_values, input_ids, attention_mask, ...
    loss.backward()

    trainer = hf.ContrastiveTrainer(model=model, args=args, train_dataset=ds, micro_batch_size=64)

The features are the model's own: ``get_image_features`` / ``get_text_features`` (their projected
pooled output), L2-normalised as the models' forward normalises them; the multiplier is
``logit_scale.exp()`` and, for SigLIP, ``logit_bias`` as is. The model's full forward (and its
logits) never runs. Under DDP or FSDP2 both feature calls run inside the wrapper's forward (its
``forward`` is swapped for that one call), so the wrapper's hooks see a normal forward.

Which loss: ``loss="auto"`` takes SigLIP's when the model has a ``logit_bias`` (SiglipModel,
Siglip2Model), CLIP's otherwise (CLIPModel, ChineseCLIPModel, MetaClip2Model, ...).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import functional
from .._microbatch import check_size
from ..gradcache import GradCache, swapped_forward
from ..spec import Backend, check_settings
from .fsdp import is_fsdp, shardable  # noqa: F401 - shardable: part of this module's API

from transformers import Trainer

LOSSES = ("auto", "clip", "siglip")
NEEDED = ("get_image_features", "get_text_features")
# Keys a batch may carry that are not encoder inputs: ignored (ids are taken as keywords).
NOT_INPUTS = frozenset({"return_loss", "labels", "label", "label_ids", "return_dict", "image_ids", "text_ids"})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def loss_family(model: nn.Module, loss: str = "auto") -> str:
    """"clip" or "siglip" for this model, after checking it has what the loss needs."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    inner = unwrap(model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"model must be an nn.Module (a Hugging Face dual encoder), got {type(model).__name__}")
    name = type(inner).__name__
    missing = [m for m in NEEDED if not callable(getattr(inner, m, None))]
    if not isinstance(getattr(inner, "logit_scale", None), Tensor):
        missing.append("logit_scale")
    if missing:
        raise TypeError(
            f"{name} has no {', '.join(missing)}: megabatch.integrations.hf needs a dual encoder with "
            "get_image_features, get_text_features and a logit_scale parameter (CLIPModel, SiglipModel, "
            "Siglip2Model, ...)"
        )
    has_bias = isinstance(getattr(inner, "logit_bias", None), Tensor)
    if loss == "auto":
        return "siglip" if has_bias else "clip"
    if loss == "siglip" and not has_bias:
        raise ValueError(f"loss='siglip' needs a logit_bias parameter, and {name} has none")
    return loss


def split_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a batch into get_image_features' and get_text_features' keyword arguments, by their
    signatures (pixel_values, pixel_attention_mask, spatial_shapes / input_ids, attention_mask,
    position_ids, ...)."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping (the batch's keyword arguments), got {type(inputs).__name__}")
    inner = unwrap(model)
    image_args = _named_parameters(inner.get_image_features)
    text_args = _named_parameters(inner.get_text_features)
    image = {k: v for k, v in inputs.items() if k in image_args and v is not None}
    text = {k: v for k, v in inputs.items() if k in text_args and v is not None}
    unknown = sorted(k for k in inputs if k not in image_args and k not in text_args and k not in NOT_INPUTS)
    if unknown:
        raise ValueError(
            f"inputs has keys {unknown} that neither get_image_features {sorted(image_args)} nor "
            f"get_text_features {sorted(text_args)} of {type(inner).__name__} takes"
        )
    for side, kwargs, first in (("image", image, "pixel_values"), ("text", text, "input_ids")):
        if not any(isinstance(v, Tensor) for v in kwargs.values()):
            raise ValueError(f"inputs has no {side} tensors (expected {first!r} among its keys, got {sorted(inputs)})")
    return image, text


def image_features(model: nn.Module, **image_inputs: Any) -> Tensor:
    """L2-normalised ``get_image_features`` of an (unwrapped) Hugging Face dual encoder."""
    return _normalised(model.get_image_features(**image_inputs), "get_image_features")


def text_features(model: nn.Module, **text_inputs: Any) -> Tensor:
    """L2-normalised ``get_text_features`` of an (unwrapped) Hugging Face dual encoder."""
    return _normalised(model.get_text_features(**text_inputs), "get_text_features")


def logit_params(model: nn.Module, family: str) -> tuple[Tensor, ...]:
    """The loss's scalar arguments: (logit_scale.exp(),) for CLIP, (logit_scale.exp(), logit_bias) for SigLIP."""
    scale = model.logit_scale.exp()
    # a copy, not the leaf: DDP's unused-parameter search needs a grad_fn (and FSDP2 warns of views)
    return (scale,) if family == "clip" else (scale, model.logit_bias.clone())


class ContrastiveLoss:
    """The exact global CLIP / SigLIP loss of a Hugging Face dual encoder.

    Args:
        loss: "auto" (SigLIP when the model has a logit_bias, else CLIP), "clip" or "siglip".
        directions: CLIP only: "both", "image_to_text" or "text_to_image".
        strategy, backend, group: as for :func:`megabatch.clip_loss` ("auto": ring when
            torch.distributed is initialised with several ranks).
        ranks_per_node: strategy="hierarchical" only, as for :func:`megabatch.clip_loss`: ranks per
            node (None: torchrun's LOCAL_WORLD_SIZE).
        memory_budget: auto's per-rank byte budget (None: the device's free memory).
        micro_batch_size: None, or the examples per encoder call for GradCache (activations for
            that many at a time; exact gradients). Then use :meth:`backward`.

    ``loss_fn(model, inputs)`` returns the loss with its graph (no micro-batching).
    ``loss_fn.backward(model, inputs)`` back-propagates it (through GradCache when micro_batch_size
    is set) and returns it detached. ``model`` may be the bare model or its DDP / FSDP2 wrapper;
    ``image_ids=`` / ``text_ids=`` (positives by ids, see megabatch.clip_loss) are keywords.
    """

    def __init__(
        self,
        *,
        loss: str = "auto",
        directions: str = "both",
        strategy: str = "auto",
        backend: Backend = "auto",
        group: Optional["dist.ProcessGroup"] = None,
        micro_batch_size: Optional[int] = None,
        ranks_per_node: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_settings(strategy=strategy, backend=backend, group=group, ranks_per_node=ranks_per_node,
                       directions=directions)
        check_size("micro_batch_size", micro_batch_size, optional=True)
        self.loss, self.directions, self.strategy, self.backend = loss, directions, strategy, backend
        self.group, self.micro_batch_size, self.ranks_per_node = group, micro_batch_size, ranks_per_node
        self.memory_budget = memory_budget

    def __repr__(self) -> str:
        return (f"ContrastiveLoss(loss={self.loss!r}, strategy={self.strategy!r}, backend={self.backend!r}, "
                f"micro_batch_size={self.micro_batch_size})")

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any], *, image_ids: Optional[Tensor] = None,
                 text_ids: Optional[Tensor] = None) -> Tensor:
        if self.micro_batch_size is not None:
            raise RuntimeError(
                "this ContrastiveLoss micro-batches the encoders (micro_batch_size is set): call "
                ".backward(model, inputs), which back-propagates through GradCache and returns the loss"
            )
        family = loss_family(model, self.loss)
        inner = unwrap(model)
        image, text = split_inputs(inner, inputs)

        def both() -> tuple[Tensor, ...]:
            return (image_features(inner, **image), text_features(inner, **text), *logit_params(inner, family))

        x, y, *params = as_forward(model, both)
        return self._loss_fn(family)(x, y, *params, image_ids=image_ids, text_ids=text_ids)

    def backward(self, model: nn.Module, inputs: Mapping[str, Any], *, image_ids: Optional[Tensor] = None,
                 text_ids: Optional[Tensor] = None) -> Tensor:
        """Back-propagate the loss into the parameters' ``.grad``; return it detached."""
        if self.micro_batch_size is None:
            loss = self(model, inputs, image_ids=image_ids, text_ids=text_ids)
            loss.backward()
            return loss.detach()
        family = loss_family(model, self.loss)
        inner = unwrap(model)
        image, text = split_inputs(inner, inputs)
        sharded = is_fsdp(model)
        if sharded:  # the feature methods gather the root's own parameters; so does unshard() for the scalars
            if not getattr(model, "_megabatch_forward_methods", False):
                from torch.distributed.fsdp import register_fsdp_forward_method

                for name in NEEDED:
                    register_fsdp_forward_method(model, name)
                model._megabatch_forward_methods = True
            model.unshard()
        cache = GradCache(
            functools.partial(image_features, inner), functools.partial(text_features, inner), self._loss_fn(family),
            self.micro_batch_size, modules=[model] if isinstance(model, DDP) or sharded else None,
        )
        ids = {k: v for k, v in (("image_ids", image_ids), ("text_ids", text_ids)) if v is not None}
        return cache(image, text, *logit_params(inner, family), **ids)

    def _whole(self) -> "ContrastiveLoss":
        return ContrastiveLoss(loss=self.loss, directions=self.directions, strategy=self.strategy,
                               backend=self.backend, group=self.group, ranks_per_node=self.ranks_per_node,
                               memory_budget=self.memory_budget)

    def _loss_fn(self, family: str) -> Callable[..., Tensor]:
        settings = dict(strategy=self.strategy, backend=self.backend, group=self.group,
                        ranks_per_node=self.ranks_per_node, memory_budget=self.memory_budget)
        if family == "clip":
            return lambda x, y, s, **ids: functional.clip_loss(x, y, s, directions=self.directions, **ids, **settings)
        return lambda x, y, s, b, **ids: functional.siglip_loss(x, y, s, b, **ids, **settings)


def as_forward(wrapper: nn.Module, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Run ``fn()`` as the forward of ``wrapper`` (DDP: of its module; FSDP2 or bare: of itself), so
    the wrapper's forward hooks (DDP's reducer, FSDP2's unshard/reshard) run as for model(...)."""
    target = wrapper.module if isinstance(wrapper, DDP) else wrapper
    if not isinstance(target, nn.Module):
        return fn()
    with swapped_forward(target, lambda *_a, **_k: fn()):
        return tuple(wrapper())


def _named_parameters(method: Callable[..., Any]) -> frozenset[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in inspect.signature(method).parameters.items() if p.kind in kinds)


def _normalised(out: Any, name: str) -> Tensor:
    # transformers >= 5 returns a BaseModelOutputWithPooling whose pooler_output is projected; 4.x a tensor
    features = out if isinstance(out, Tensor) else getattr(out, "pooler_output", None)
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise TypeError(f"{name} returned {type(out).__name__} without (batch, dim) projected features "
                        "(a vision tower without its head gives none)")
    return features / features.norm(p=2, dim=-1, keepdim=True)


class ContrastiveTrainer(Trainer):
    """``transformers.Trainer`` with megabatch's exact global loss instead of the model's local one.

    Under torchrun every rank's batch joins one contrastive batch (ring or gather), and DDP's
    gradient averaging gives exactly the global batch's gradient. Keywords (besides Trainer's):
    ``loss``, ``directions``, ``strategy``, ``backend``, ``ranks_per_node``, ``memory_budget``,
    ``micro_batch_size`` as for
    :class:`ContrastiveLoss`. With ``micro_batch_size`` the towers run through GradCache (each
    rank's batch may then be much larger than its activations allow).

    Gradient accumulation splits the contrastive batch into smaller ones (a different loss), so
    ``gradient_accumulation_steps`` must be 1: use ``micro_batch_size`` for a larger exact batch.
    Positives by ids: keep ``image_ids`` / ``text_ids`` columns in the dataset (they are kept
    through ``remove_unused_columns``).
    """

    def __init__(self, *args: Any, loss: str = "auto", directions: str = "both", strategy: str = "auto",
                 backend: Backend = "auto", micro_batch_size: Optional[int] = None,
                 ranks_per_node: Optional[int] = None, memory_budget: Optional[int] = None, **kwargs: Any):
        self.contrastive = ContrastiveLoss(loss=loss, directions=directions, strategy=strategy, backend=backend,
                                           micro_batch_size=micro_batch_size, ranks_per_node=ranks_per_node,
                                           memory_budget=memory_budget)
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: accumulation splits the "
                "contrastive batch (each part sees only its own negatives); set it to 1 and use micro_batch_size "
                "for an exact larger batch"
            )
        if micro_batch_size is not None and self.args.fp16:
            raise ValueError("micro_batch_size (GradCache) back-propagates itself, without fp16's loss scaling: "
                             "use bf16")
        loss_family(self.model, loss)  # a clear error now, not at the first step
        self.can_return_loss = True  # evaluate() reports eval_loss without labels (our loss needs none)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        inner = unwrap(self.model)
        extra = _named_parameters(inner.get_image_features) | _named_parameters(inner.get_text_features)
        kept = [*self._signature_columns, *sorted(extra), "image_ids", "text_ids"]
        self._signature_columns = list(dict.fromkeys(kept))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        ids = {k: inputs[k] for k in ("image_ids", "text_ids") if inputs.get(k) is not None}
        whole = self.contrastive if self.contrastive.micro_batch_size is None else self.contrastive._whole()
        with self.accelerator.autocast():  # the swapped forward bypasses accelerate's autocast wrapper
            loss = whole(model, inputs, **ids)  # (with micro_batch_size: evaluation, no gradients to cache)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        if self.contrastive.micro_batch_size is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        ids = {k: inputs[k] for k in ("image_ids", "text_ids") if inputs.get(k) is not None}
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            return self.contrastive.backward(model, inputs, **ids)
