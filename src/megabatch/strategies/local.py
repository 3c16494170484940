"""`local` strategy: one process's batch, no communication (also the single-GPU path): one visit."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._comm import Layout
from .base import Block, Visit


class Local:
    name = "local"

    def __init__(self, b: int, n: int, y_grad: bool, ids: bool):
        self.visits_once = True  # one visit: the row side can be finished as the kernels go
        self.lay = Layout(None, 0, (b,), (n,), y_grad, ids)

    def circulate(self, fixed: Sequence[Tensor], travel: Sequence[Tensor], visit: Visit,
                  accs: Sequence[str] = ()) -> list[Tensor]:
        parts = list(visit(Block([*fixed, *travel], 0)))
        assert len(parts) == len(accs)
        return parts

    def all_sum(self, t: Tensor) -> Tensor:
        return t

    def release(self) -> None:
        pass
