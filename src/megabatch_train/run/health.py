"""Is the run learning? Embedding statistics on a probe of the batch, a collapse warning, and the
SigLIP bias that a batch size calls for.

Two collapses were measured on this app (issue 14), both ending with exit 0 and no warning before:
  * every image (and every text) embedding points one way: the mean image-image and text-text
    cosines near 1 (CLIP at a too-high learning rate);
  * every image-text pair at one cosine: the spread (sd) of the pair cosines near 0, e.g. SigLIP
    at t = 10, b = -10 and batch 1,024, where all pairs sat at c = 0.31 (sd 0.005), the point where
    the bias's gradient vanishes: t*c + b = -ln(B - 1).
Randomly initialised towers look collapsed too (cosines ~0.95 at step 0 here), so the warning is
given only once the warmup is over and a tenth of the run is done: an embedding that has not left
that state by then is not learning. A warned run is said to have recovered only once every one of
those statistics is on the healthy side of its threshold -- both mean cosines at most
SAME_DIRECTION and the sd at least FLAT_PAIRS -- so "recovered" never comes with an image-image
cosine of 0.995 (one tower still collapsed: the warning's condition wants both, the recovery none).
The messages name the run's two sides as its eval data does (`EvalData.sides`): "image-image" and
"text-text" for image-text pairs, "definition-definition" and "name-name" for --data wordnet. The
metrics' keys stay cos_image_image and cos_text_text (the query side, the caption side) for any data.

Why SigLIP stalled in short runs (preset small, synthetic, batch 1,024, 60 steps; README "SigLIP
in short runs" has the numbers). Per pair the sigmoid loss's gradient on the logit is
sigma(z) - y. (1) With the paper's t = 10, b = -10, at B = 1,024 a row's B - 1 negatives push
with ~0.05 of its positive's pull, so the towers raise every cosine until t*c + b = -ln(B - 1)
(c = 0.31), where b's gradient is zero. Starting b at -ln(B - 1) (`balanced_bias`; the paper's -10
is that value near B = 22k) removes that point, but not the collapse: (2) randomly initialised
towers start nearly collapsed (image-image cosines ~0.97): every embedding is a large common
vector plus a small deviation. The sigmoid loss charges each row's and column's logit offset
exponentially (sum of e^z over the negatives), and at the start most of a sample's difference from
the others is such an offset (its deviation along the other tower's common vector), not agreement
with its own partner; the cheapest descent shrinks the deviations, and both towers collapse. A
softmax (CLIP) is blind to a row's offset, so it never feels that force. Hence the towers'
`Center` (towers.py, the default for SigLIP): the batch mean is subtracted before normalising,
with the gradient through it, so the common vector and the offsets it makes are gone from the
loss and its gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE = 256  # samples of the batch the statistics are measured on
SAME_DIRECTION = 0.9  # mean image-image and text-text cosines above this: one direction
FLAT_PAIRS = 0.01  # sd of the image-text cosines below this: every pair at one cosine
SIDES = ("image", "text")  # the two sides' names in the messages; text-text data names its own


def balanced_bias(batch_size: int) -> float:
    """SigLIP's bias at which, with all logits equal to it, a row's B - 1 negatives push exactly as
    hard as its positive pulls: -ln(B - 1) (0 for B <= 2)."""
    return -math.log(batch_size - 1) if batch_size > 2 else 0.0


@torch.no_grad()
def embedding_stats(model: nn.Module, images: Tensor, tokens: Tensor) -> dict[str, float]:
    """Mean off-diagonal image-image and text-text cosines, and the mean and sd of all image-text
    cosines, of the first PROBE samples (the model's mode is left as it was)."""
    n = min(PROBE, len(images))
    was = model.training
    model.eval()
    try:
        x = F.normalize(model.encode_image(images[:n]).float(), dim=-1)
        y = F.normalize(model.encode_text(tokens[:n]).float(), dim=-1)
    finally:
        model.train(was)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    pairs = x @ y.T
    stats = {"cos_image_image": float((x @ x.T)[off].mean()) if n > 1 else 1.0,
             "cos_text_text": float((y @ y.T)[off].mean()) if n > 1 else 1.0,
             "cos_pairs_mean": float(pairs.mean()), "cos_pairs_sd": float(pairs.std()) if n > 1 else 0.0}
    return stats


def collapse_warning(stats: dict[str, float], step: int, steps: int, warmup: int, loss: str,
                     batch_size: int, logit_scale: float, logit_bias: Optional[float],
                     sides: tuple[str, str] = SIDES) -> Optional[str]:
    """A sentence naming the collapse and its likely cause, or None (also None before the warmup is
    over and a tenth of the run is done). `sides` names what the query and caption sides hold (the
    eval data's: ("definition", "name") for --data wordnet), as the sentence calls them."""
    if step < max(warmup, steps // 10, 1):
        return None
    query, caption = sides
    if stats["cos_image_image"] > SAME_DIRECTION and stats["cos_text_text"] > SAME_DIRECTION:
        what = (f"{query}-{query} cosines average {stats['cos_image_image']:.3f} and {caption}-{caption} "
                f"{stats['cos_text_text']:.3f} (above {SAME_DIRECTION:g}): every embedding points one way")
    elif stats["cos_pairs_sd"] < FLAT_PAIRS:
        what = (f"every {query}-{caption} pair has cosine {stats['cos_pairs_mean']:.3f} "
                f"(sd {stats['cos_pairs_sd']:.4f}, below {FLAT_PAIRS:g}): the towers no longer tell pairs apart")
    else:
        return None
    if loss == "siglip" and logit_bias is not None:
        c_star = (-math.log(max(batch_size - 1, 1)) - logit_bias) / logit_scale
        cause = (f"likely cause: the SigLIP bias b = {logit_bias:.2f} is out of balance with the batch "
                 f"(t*c + b = -ln(B-1) at c = {c_star:.3f} for t = {logit_scale:.2f}, B = {batch_size}); "
                 f"start b at -ln(B-1) = {balanced_bias(batch_size):.2f} (the default unless --logit-bias-init "
                 "is given) or lower --lr")
    else:
        cause = "likely cause: a learning rate too high for this batch (try --lr 3x lower or more --warmup-steps)"
    return f"embeddings collapsed at step {step}: {what}; {cause}"


def recovery_note(stats: dict[str, float], step: int, sides: tuple[str, str] = SIDES) -> Optional[str]:
    """After a collapse warning: a sentence saying the embeddings recovered, or None while any
    statistic is still on the collapsed side of its threshold (one tower pointing one way is not a
    recovery, even though the warning needs both). `sides` as for collapse_warning."""
    ii, tt, sd = stats["cos_image_image"], stats["cos_text_text"], stats["cos_pairs_sd"]
    if max(ii, tt) > SAME_DIRECTION or sd < FLAT_PAIRS:
        return None
    query, caption = sides
    return (f"embeddings recovered by step {step}: {query}-{query} cosine {ii:.3f} and {caption}-{caption} {tt:.3f} "
            f"(both at most {SAME_DIRECTION:g}), pair cosine sd {sd:.3f} (at least {FLAT_PAIRS:g})")
