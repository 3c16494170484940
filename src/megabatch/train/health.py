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
that state by then is not learning.

Why SigLIP stalls at small batches. Per pair the sigmoid loss's gradient on the logit is
sigma(z) - y. At init all logits are ~b: each positive pulls with 1 - sigma(b), the B - 1
negatives of a row push with (B - 1) sigma(b) together. The paper's b = -10 balances them only at
B ~ e^10 ~ 22k (its 32k batches); at B = 1,024 the negatives' push is ~0.05 of the positives'
pull, so the towers raise every cosine at once (the collapse above) instead of separating pairs.
Adam moves the scalar b by ~lr a step, far too slowly to fix the balance itself (3 units at
lr 1e-3 take thousands of steps), and at the collapse point its gradient is zero. Hence the app's
default b0 = -ln(B - 1): the positives' pull and the negatives' push balance at the start, at any
global batch B (it equals the paper's -10 near B = 22k).
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
                     batch_size: int, logit_scale: float, logit_bias: Optional[float]) -> Optional[str]:
    """A sentence naming the collapse and its likely cause, or None (also None before the warmup is
    over and a tenth of the run is done)."""
    if step < max(warmup, steps // 10, 1):
        return None
    if stats["cos_image_image"] > SAME_DIRECTION and stats["cos_text_text"] > SAME_DIRECTION:
        what = (f"image-image cosines average {stats['cos_image_image']:.3f} and text-text "
                f"{stats['cos_text_text']:.3f}: every embedding points one way")
    elif stats["cos_pairs_sd"] < FLAT_PAIRS:
        what = (f"every image-text pair has cosine {stats['cos_pairs_mean']:.3f} "
                f"(sd {stats['cos_pairs_sd']:.4f}): the towers no longer tell pairs apart")
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
