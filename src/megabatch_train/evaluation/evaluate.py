"""Held-out evaluation: zero-shot classification with prompts, and image<->text retrieval R@1/5/10
(text-text data: query<->caption, e.g. WordNet's definition<->name, scored the same way, beside the
pretrained MiniLM's own scores: `zero_shot_model`).

Retrieval runs over the evaluation images and their *distinct* captions (several images may share
one caption); ties rank against the model. image->text: is the image's caption among the k texts
most similar to it? (chance k/u for u distinct captions). text->image: is one of the images
carrying that caption among the k most similar? (chance 1 - C(n-m, k)/C(n, k) for m of n, averaged).
Zero-shot: a class's embedding is the normalised mean of its prompts' normalised embeddings;
top-1 accuracy, with the majority-class rate as chance. `zero_shot_top1` averages the tasks. A
task may score properties of its classes (zero_shot_<attribute>_top1: the predicted class has the
true class's attribute).

Scores only a finite model: a NaN similarity fails every comparison, so the rank counts below
would put every caption first (R@1 = 1.0 for a model whose weights are all NaN). When any
embedding holds a NaN or an infinity, every metric is NaN and "non_finite" says which embeddings.
A metric whose chance level is 50% or more (R@5 over 5 captions, a 2-way task) says little about
the model: its key is listed in "not_meaningful".
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.types import EvalData

KS = (1, 5, 10)
MEANINGLESS_CHANCE = 0.5  # a metric whose chance level is this or more is listed as not meaningful


def _encode(fn: Callable[[Tensor], Tensor], inputs: Tensor, device: torch.device, batch: int,
            what: str, non_finite: list[str]) -> Tensor:
    """Normalised embeddings of `inputs`; appends "<what> hold NaN" (or inf) to `non_finite` if
    the raw embeddings are not all finite (normalising turns an inf into NaN, so look before)."""
    out, nan, inf = [], False, False
    for i in range(0, len(inputs), batch):
        raw = fn(inputs[i : i + batch].to(device)).float()
        nan, inf = nan or bool(raw.isnan().any()), inf or bool(raw.isinf().any())
        out.append(F.normalize(raw, dim=-1))
    if nan or inf:
        non_finite.append(f"{what} hold {' and '.join(k for k, bad in (('NaN', nan), ('inf', inf)) if bad)}")
    return torch.cat(out).cpu()


def _chance_any_in_top_k(n: int, m: np.ndarray, k: int) -> float:
    """Mean over queries of P(a random ranking of n items puts one of the query's m in the top k)."""
    if k >= n:
        return 1.0
    miss = [math.comb(n - int(mi), k) / math.comb(n, k) for mi in m]
    return float(1.0 - np.mean(miss))


def retrieval(images: Tensor, texts: Tensor, caption_of: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(R@k of both directions, their chance levels) for normalised query embeddings `images` (n, D), the
    distinct captions' `texts` (u, D), and the caption index of each query `caption_of` (n,)."""
    sims = images @ texts.T  # (n, u)
    owner = torch.from_numpy(caption_of.astype(np.int64))
    # Ties count against the model: a collapsed model (all similarities equal) ranks last.
    is_owner = owner[:, None] == torch.arange(len(texts))[None, :]  # (n, u)
    correct = sims.gather(1, owner[:, None])
    i2t_rank = (sims > correct).sum(1) + ((sims == correct) & ~is_owner).sum(1)
    best = sims.masked_fill(~is_owner, -math.inf).max(0).values
    t2i_rank = (sims > best[None, :]).sum(0) + ((sims == best[None, :]) & ~is_owner).sum(0)
    out: dict[str, float] = {}
    chance: dict[str, float] = {}
    for k in KS:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
        chance[f"i2t_r{k}"] = min(1.0, k / len(texts))
        chance[f"t2i_r{k}"] = _chance_any_in_top_k(len(images), is_owner.sum(0).numpy(), k)
    return out, chance


@torch.no_grad()
def zero_shot_model(data: EvalData, context_length: int, device: torch.device, batch: int = 512) -> dict[str, Any]:
    """The pretrained text model's retrieval on text-text `data` (its `queries` and captions as strings):
    all-MiniLM-L6-v2's sentence embeddings as they are (no heads, no training), cosine similarity, with
    `context_length` MiniLM tokens (the run's). Locked MiniLM's process-wide cache keeps the embeddings, so
    a locked run's evaluations reuse them. {"unavailable": why} when MiniLM is not installed."""
    from ..models.minilm import MiniLMText, MiniLMTokenizer, MiniLMUnavailable

    if data.queries is None:
        raise ValueError("zero_shot_model needs text queries (EvalData.queries): text-text data")
    try:
        tokenize, encoder = MiniLMTokenizer(max(3, context_length)), MiniLMText(None, locked=True)
    except MiniLMUnavailable as e:
        return {"unavailable": str(e)}
    texts, caption_of = np.unique(np.asarray(data.captions, dtype=object), return_inverse=True)
    non_finite: list[str] = []
    queries = _encode(encoder, tokenize(data.queries), device, batch, "queries", non_finite)
    captions = _encode(encoder, tokenize(list(texts)), device, batch, "captions", non_finite)
    out, _ = retrieval(queries, captions, caption_of)
    return {"model": f"all-MiniLM-L6-v2 as pretrained (cosine, no heads; context {max(3, context_length)})", **out}


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenize: Callable[[list[str]], Tensor], data: EvalData, device: torch.device, batch: int = 512
) -> dict[str, Any]:
    """Metrics of `model` on `data` (floats in [0, 1]; NaN for a non-finite model, with "non_finite"
    saying why) and, under "chance", what guessing scores; "not_meaningful" lists the metrics whose
    chance is >= 50%."""
    was_training = model.training
    model.eval()
    non_finite: list[str] = []
    try:
        images = _encode(model.encode_image, data.images, device, batch, f"{data.sides[0]} embeddings", non_finite)
        texts, caption_of = np.unique(np.asarray(data.captions, dtype=object), return_inverse=True)
        text_feats = _encode(model.encode_text, tokenize(list(texts)), device, batch, f"{data.sides[1]} embeddings",
                             non_finite)
        out, chance = retrieval(images, text_feats, caption_of)
        accs, chances = [], []
        for task in data.tasks:
            flat = [p for prompts in task.prompts for p in prompts]
            feats = _encode(model.encode_text, tokenize(flat), device, batch,
                            f"text embeddings of the {task.name} prompts", non_finite)
            sizes = torch.tensor([len(p) for p in task.prompts])
            cls = F.normalize(torch.stack([c.mean(0) for c in feats.split(sizes.tolist())]), dim=-1)
            task_images = images if task.rows is None else images[torch.as_tensor(task.rows, dtype=torch.long)]
            pred = (task_images @ cls.T).argmax(1).numpy()
            acc = float((pred == task.labels).mean())
            major = float(np.bincount(task.labels, minlength=len(task.classes)).max() / len(task.labels))
            out[f"zero_shot_{task.name}_top1"], chance[f"zero_shot_{task.name}_top1"] = acc, major
            for attr, value in task.attributes.items():
                key = f"zero_shot_{attr}_top1"
                out[key] = float((value[pred] == value[task.labels]).mean())
                chance[key] = float(np.bincount(value[task.labels]).max() / len(task.labels))
            accs.append(acc)
            chances.append(major)
        if accs:
            out["zero_shot_top1"], chance["zero_shot_top1"] = float(np.mean(accs)), float(np.mean(chances))
        out["n_images"], out["n_texts"], out["eval_set"] = len(images), len(texts), data.description
        if data.sides != ("image", "text"):
            out["sides"] = list(data.sides)  # what i2t's "image" and "text" are (report.py labels them so)
        if data.reference is not None:
            out["zero_shot_model"] = data.reference
        out["zero_shot_classes"] = {task.name: len(task.classes) for task in data.tasks}
        out["chance"] = chance
        out["not_meaningful"] = [key for key, level in chance.items() if level >= MEANINGLESS_CHANCE]
        if non_finite:  # nothing above measured the model: no score may stand
            out.update({key: math.nan for key in chance})
            out["non_finite"] = "; ".join(dict.fromkeys(non_finite))
        return out
    finally:
        model.train(was_training)
