"""Which pairs are positive, as the families hand them to the kernels, and the positive counts.

Index positives (no ids): image i of rank r pairs with text i of the same rank, for
i < min(b_r, n_r); every other text is a negative (hard negatives go after the positives).
Ids: pair (i, j) is positive iff image_ids[i] == text_ids[j], across ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.base import Positives
from ..strategies import Block, Strategy


def block_positives(strat: Strategy, b: int, xid: Optional[Tensor], blk: Block) -> Optional[Positives]:
    """The positives between this rank's b images and a visited column block."""
    if xid is not None:
        return Positives(image_ids=xid, text_ids=blk.tensors[1])
    lay = strat.lay
    own = lay.toffset(lay.rank)
    return Positives.index(own - blk.start, min(b, lay.tsizes[lay.rank]), b, blk.n)


def id_counts(xid: Tensor, yid: Tensor) -> tuple[Tensor, Tensor]:
    """(number of texts matching each image, number of images matching each text), float64.

    By sorting and binary search, O((b + n) log): no b x n comparison, no host sync."""
    return _matches(xid, yid), _matches(yid, xid)


def _matches(keys: Tensor, pool: Tensor) -> Tensor:
    if pool.numel() == 0 or keys.numel() == 0:
        return torch.zeros(keys.shape[0], dtype=torch.float64, device=keys.device)
    sorted_pool = torch.sort(pool).values
    left = torch.searchsorted(sorted_pool, keys, right=False)
    right = torch.searchsorted(sorted_pool, keys, right=True)
    return (right - left).to(torch.float64)
