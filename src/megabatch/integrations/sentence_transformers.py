"""sentence-transformers: a loss for its trainer that is exact over every rank's texts.

    from megabatch.integrations.sentence_transformers import MegabatchLoss
    loss = MegabatchLoss(model)                                   # = MultipleNegativesRankingLoss(model)
    loss = MegabatchLoss(model, mini_batch_size=32)               # = CachedMultipleNegativesRankingLoss(...)
    loss = MegabatchLoss(model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)

The columns are ST's: (anchor, positive, negative_1, ..., negative_n). The anchors are the "images"
of megabatch.clip_loss and [positives | negatives] its texts, so the loss is MNRL's definition
(cos sim times the scale, a softmax over every text of the global batch; docs/design.md), computed
tiled and, under torchrun, over every rank's texts (ring or gather; uneven batches allowed).
What it adds: several positive columns (``positive_columns=k``), positives by the hash of each
text's unpadded input ids (``positives="anchor"`` / ``"positive"``: identical texts are never each
other's negatives, with dropout or without), SigLIP, a learnable scale (and bias) that stays equal
on every rank, and GradCache (``mini_batch_size``). Docs: docs/integrations.md.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import functional
from .._checks import real_number
from .._microbatch import check_size
from ..gradcache import GradCache
from ..spec import Backend, check_settings

try:
    import sentence_transformers  # noqa: F401 - only to fail early with the extra's name
except ImportError as e:  # pragma: no cover - the dev install has it
    raise ImportError(
        "megabatch.integrations.sentence_transformers needs sentence-transformers>=6.2 with its trainer: "
        "pip install 'megabatch[st]'"
    ) from e

LOSSES = ("clip", "siglip")
# Where the scale (and SigLIP's bias) start unless given: MNRL's 20 for CLIP, the SigLIP paper's t = 10, b = -10.
DEFAULT_SCALE = {"clip": 20.0, "siglip": 10.0}
DEFAULT_BIAS = -10.0
POSITIVES = ("position", "anchor", "positive")
ONE_WAY, SYMMETRIC = ("query_to_doc",), ("query_to_doc", "doc_to_query")
# Ids of one rank's rows: rank * SPAN + row (SPAN rows a rank at most); hashes are masked to 62 bits.
SPAN = 1 << 40
HASH_MASK = (1 << 62) - 1
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the rolling hash


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def text_hash(input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """(n,) int64 in [0, 2**62): a hash of each row's unpadded token ids (padding left or right).

    Computed on the device in wrapping int64 arithmetic (no host read); equal texts give equal
    hashes whatever their padding, and the embeddings' dropout plays no part.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    length = input_ids.shape[1]
    powers, p = [], 1
    for _ in range(length + 1):
        powers.append(_signed(p))
        p = (p * _MULT) % (1 << 64)
    table = torch.tensor(powers, dtype=torch.int64, device=input_ids.device)
    position = (mask.cumsum(1) - 1).clamp(min=0)  # index among the unpadded tokens
    terms = (input_ids.long() + 1) * table[position] * mask
    h = terms.sum(1) + mask.sum(1) * table[length]
    return (h ^ (h >> 29)) & HASH_MASK


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the group's ranks.

    ST's trainer wraps only the model in DDP, so the loss's own scale and bias would otherwise keep
    each rank's share of their gradient (docs/design.md: only the mean over ranks is exact)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


class _Scalars(nn.Module):
    """The learnable logit_scale (log of the multiplier) and SigLIP's logit_bias."""

    def __init__(self, scale: float, bias: Optional[float]):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))


class MegabatchLoss(nn.Module):
    """megabatch's exact global CLIP / SigLIP loss for ``SentenceTransformerTrainer``.

    Args:
        model: the SentenceTransformer (the trainer swaps in its DDP wrapper).
        loss: "clip" (MNRL's InfoNCE) or "siglip" (pairwise sigmoid, scale and bias).
        scale: the multiplier of the cosine similarities, any positive real number. None: 20 for
            "clip" (MNRL's), 10 for "siglip" (where the SigLIP paper starts it).
        bias: SigLIP's bias, any real number. None: -10 for "siglip" (the paper's start); CLIP has none.
        learnable: make scale (and bias) parameters. They live in ``self.norm`` so that the
            trainer's weight-decay rule (no decay for names with a ``norm`` part) spares them, and
            their gradient is averaged over the ranks, so they stay equal on every rank.
        directions, partition_mode: as MNRL's: ("query_to_doc",) (one-way, the default) or
            ("query_to_doc", "doc_to_query") with partition_mode="per_direction" (symmetric).
        positive_columns: how many columns after the anchor are its positives (the rest are
            hard negatives).
        positives: which texts are positives of an anchor. "position": its own row's positive
            columns (MNRL). "anchor": also those of every anchor with the same input ids.
            "positive": every text (positive or negative column, any row) with the same input ids
            as its positive (one positive column only).
        mini_batch_size: None, or GradCache's micro-batch (CachedMNRL's ``mini_batch_size``).
        strategy, backend, group: as for :func:`megabatch.clip_loss`; "auto" spans every rank
            (MNRL's ``gather_across_devices=True``); "local" is MNRL's default per-rank loss.
        ranks_per_node: strategy="hierarchical" only, as for :func:`megabatch.clip_loss`: ranks per
            node (None: torchrun's LOCAL_WORLD_SIZE).
        memory_budget: auto's per-rank byte budget (None: the device's free memory).
    """

    def __init__(self, model: nn.Module, *, loss: str = "clip", scale: Optional[float] = None,
                 bias: Optional[float] = None,
                 learnable: bool = False, directions: Iterable[str] = ONE_WAY, partition_mode: str = "joint",
                 positive_columns: int = 1, positives: str = "position", mini_batch_size: Optional[int] = None,
                 strategy: str = "auto", backend: Backend = "auto", group: Optional[Any] = None,
                 ranks_per_node: Optional[int] = None, memory_budget: Optional[int] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a SentenceTransformer, got {type(model).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if scale is None:
            scale = DEFAULT_SCALE[loss]
        number = real_number(scale)
        if number is None:
            raise TypeError(f"scale must be a positive real number (float, int, numpy.float32, ...) or None, "
                            f"got {type(scale).__name__}")
        if not (number > 0 and math.isfinite(number)):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if loss == "clip" and bias is not None:
            raise ValueError("bias is SigLIP's (loss='siglip'); CLIP has none")
        if loss == "siglip" and bias is None:
            bias = DEFAULT_BIAS
        if bias is not None:
            bias_number = real_number(bias)
            if bias_number is None:
                raise TypeError(f"bias must be a real number (float, int, numpy.float32, ...) or None, "
                                f"got {type(bias).__name__}")
            bias = bias_number
        directions = tuple(directions) if not isinstance(directions, str) else (directions,)
        if directions not in (ONE_WAY, SYMMETRIC):
            raise ValueError(f"directions must be {ONE_WAY} or {SYMMETRIC}, got {directions!r} "
                             "(query_to_query and doc_to_doc are not offered)")
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        if directions == SYMMETRIC and partition_mode != "per_direction":
            raise ValueError("directions=('query_to_doc', 'doc_to_query') needs partition_mode='per_direction' "
                             "(one softmax per direction, averaged): the joint softmax is not offered")
        if loss == "siglip" and directions != ONE_WAY:
            raise ValueError("directions is CLIP's: SigLIP scores every pair on its own")
        if isinstance(positive_columns, bool) or not isinstance(positive_columns, int) or positive_columns < 1:
            raise ValueError(f"positive_columns must be a positive int, got {positive_columns!r}")
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        if positives == "positive" and positive_columns != 1:
            raise ValueError("positives='positive' needs positive_columns=1 (an anchor takes one text's hash); "
                             "use positives='anchor' with several positive columns")
        check_size("mini_batch_size", mini_batch_size, optional=True)
        check_settings(strategy=strategy, backend=backend, group=group, ranks_per_node=ranks_per_node)
        self.model = model
        self.loss, self.directions, self.partition_mode = loss, directions, partition_mode
        self.positive_columns, self.positives, self.mini_batch_size = positive_columns, positives, mini_batch_size
        self.strategy, self.backend, self.group, self.ranks_per_node = strategy, backend, group, ranks_per_node
        self.memory_budget = memory_budget
        self.learnable = bool(learnable)
        self.scale, self.bias = number, bias
        self.norm = _Scalars(number, bias) if self.learnable else None
        self._synced = False

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "scale": self.scale, "bias": self.bias, "learnable": self.learnable,
                "directions": self.directions, "partition_mode": self.partition_mode,
                "positive_columns": self.positive_columns, "positives": self.positives,
                "mini_batch_size": self.mini_batch_size, "strategy": self.strategy,
                "ranks_per_node": self.ranks_per_node, "memory_budget": self.memory_budget}

    # -- the scalars ---------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _scalars(self) -> tuple[Any, ...]:
        if self.norm is None:
            return (self.scale,) if self.loss == "clip" else (self.scale, float(self.bias))
        params = [self.norm.logit_scale] + ([self.norm.logit_bias] if self.loss == "siglip" else [])
        if self._distributed():
            if not self._synced:  # start equal: rank 0's values (the ranks may have seeded differently)
                with torch.no_grad():
                    for p in params:
                        dist.broadcast(p.data, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                       group=self.group)
                self._synced = True
            params = [_MeanGradOverRanks.apply(p, self.group) for p in params]
        return (params[0].exp(), *params[1:])

    # -- the loss ------------------------------------------------------------------------------
    def _loss_fn(self, x: Tensor, y: Tensor, *scalars: Any, **ids: Tensor) -> Tensor:
        settings = dict(strategy=self.strategy, backend=self.backend, group=self.group,
                        ranks_per_node=self.ranks_per_node, memory_budget=self.memory_budget)
        if self.loss == "siglip":
            return functional.siglip_loss(x, y, *scalars, **ids, **settings)
        direction = "image_to_text" if self.directions == ONE_WAY else "both"
        return functional.clip_loss(x, y, *scalars, directions=direction, **ids, **settings)

    def forward(self, sentence_features: Iterable[Mapping[str, Any]], labels: Any = None) -> Tensor:
        columns = _text_columns(sentence_features, self.positive_columns)
        ids = self._ids(columns)
        anchors, texts = columns[0], _stack_columns(columns[1:])
        model = self.model
        inner = model.module if isinstance(model, DDP) else model
        scalars = self._scalars()
        if self.mini_batch_size is None:
            return self._loss_fn(_embed(model, anchors), _embed(model, texts), *scalars, **ids)
        if not torch.is_grad_enabled():  # evaluation: no gradients to cache, the encoder still in mini-batches
            x, y = (torch.cat([_embed(model, {k: v[i:i + self.mini_batch_size] for k, v in f.items()})
                               for i in range(0, f["input_ids"].shape[0], self.mini_batch_size)])
                    for f in (anchors, texts))
            return self._loss_fn(x, y, *scalars, **ids)
        # the class's forward: under DDP GradCache runs the last micro-batch inside the wrapper's
        # forward by swapping the inner module's (instance) forward, which must not call itself
        encoder = (lambda **f: _embed(lambda d: type(inner).forward(inner, d), f)) if isinstance(model, DDP) \
            else (lambda **f: _embed(inner, f))
        # each column's rows by length, so that a mini-batch's padding (trimmed by _embed) is short; the
        # loss gets the embeddings back in row order, so the ids and the pairing are those of the batch
        (anchors, anchor_rows), (texts, text_rows) = _by_length(anchors), _by_length(texts)

        def loss_fn(x: Tensor, y: Tensor, *args: Any, **kw: Tensor) -> Tensor:
            return self._loss_fn(x[anchor_rows], y[text_rows], *args, **kw)

        cache = GradCache(encoder, encoder, loss_fn, self.mini_batch_size,
                          modules=[model] if isinstance(model, DDP) else None)
        loss = cache(anchors, texts, *scalars, **ids)
        # GradCache has filled every .grad (the model's all-reduced under DDP): the trainer's own
        # backward must add nothing, so it gets a leaf (as CachedMNRL hands it one with a hook)
        return loss.detach().requires_grad_()

    def _ids(self, columns: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.positives == "position" and self.positive_columns == 1:
            return {}  # MNRL's own pairing: row i's anchor with row i's positive, on each rank
        b, k = columns[0]["input_ids"].shape[0], self.positive_columns
        device = columns[0]["input_ids"].device
        rank = dist.get_rank(self.group) if self._distributed() and self.strategy != "local" else 0
        rows = rank * SPAN + torch.arange(b, device=device)
        negatives = [-1 - (rows + c * b) for c in range(len(columns) - 1 - k)]  # unique, never an anchor's id
        if self.positives == "positive":
            image_ids = text_hash(columns[1]["input_ids"], columns[1].get("attention_mask"))
            text_ids = [text_hash(c["input_ids"], c.get("attention_mask")) for c in columns[1:]]
            return {"image_ids": image_ids, "text_ids": torch.cat(text_ids)}
        if self.positives == "anchor":
            rows = text_hash(columns[0]["input_ids"], columns[0].get("attention_mask"))
        return {"image_ids": rows, "text_ids": torch.cat([rows] * k + negatives)}


def _text_columns(sentence_features: Any, positive_columns: int) -> list[dict[str, Tensor]]:
    """ST's columns as dicts of tensors, after checking them (text, equal row counts, enough)."""
    if isinstance(sentence_features, Mapping) or not isinstance(sentence_features, Iterable):
        raise TypeError(f"sentence_features must be a list of column feature dicts, got "
                        f"{type(sentence_features).__name__}")
    columns = []
    for i, features in enumerate(sentence_features):
        if not isinstance(features, Mapping) or not isinstance(features.get("input_ids"), Tensor):
            keys = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise TypeError(f"column {i} is not a text column (no 'input_ids' tensor; got {keys}): "
                            "MegabatchLoss takes tokenized texts only")
        columns.append({k: v for k, v in features.items() if isinstance(v, Tensor)})
    if len(columns) < 1 + positive_columns:
        raise ValueError(f"got {len(columns)} columns, need an anchor and positive_columns={positive_columns} "
                         "positive column(s): every anchor needs a positive")
    sizes = [c["input_ids"].shape[0] for c in columns]
    if len(set(sizes)) != 1:
        raise ValueError(f"the columns have different row counts {sizes}: each row is (anchor, positives..., "
                         "negatives...)")
    return columns


def _stack_columns(columns: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Texts of several columns as one batch, column after column, right-padded to one width
    (as ST itself merges its candidate columns; masked padding changes no embedding)."""
    if len(columns) == 1:
        return columns[0]
    keys = set.intersection(*(set(c) for c in columns))
    width = max(c["input_ids"].shape[1] for c in columns)
    out = {}
    for k in sorted(keys):
        parts = [c[k] if c[k].dim() < 2 else F.pad(c[k], (0, width - c[k].shape[1])) for c in columns]
        out[k] = torch.cat(parts)
    return out


def _by_length(features: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The rows sorted by their number of real tokens (stable), and where each original row went."""
    mask = features.get("attention_mask")
    n = features["input_ids"].shape[0]
    if mask is None or mask.dim() != 2:
        return features, torch.arange(n, device=features["input_ids"].device)
    order = torch.argsort(mask.sum(1), stable=True)
    return {k: v[order] if v.dim() >= 1 and v.shape[0] == n else v for k, v in features.items()}, torch.argsort(order)


def _trimmed(features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The columns after the last real token of every row dropped. Exact: no real token moves and the
    dropped ones were masked out everywhere. A GradCache mini-batch of short texts then costs what its
    own texts need, not what the longest text of the collated batch needed (~3x less on WordNet)."""
    mask = features.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return dict(features)
    width = mask.shape[1]
    used = mask.any(0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1
    if keep == width:
        return dict(features)
    return {k: v[:, :keep] if v.dim() == 2 and v.shape[1] == width else v for k, v in features.items()}


def _embed(model: Callable[[dict], Any], features: Mapping[str, Tensor]) -> Tensor:
    """The L2-normalised sentence embeddings (ST's cos_sim normalises the same way)."""
    out = model(_trimmed(features))["sentence_embedding"]  # a copy: ST's modules add keys to the dict
    return F.normalize(out, p=2, dim=-1)
