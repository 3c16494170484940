"""Contract: the chunked backend's extra memory for forward+backward is O(B*D + tile*B), never
O(B^2). Peak RSS of a fresh process per case (the bench's measurement of its first call; no timed
repeat) at B=4096 and 8192, D=64:
doubling B must not quadruple the extra memory, and at 8192 it stays far under what the dense
matrix path takes (~1.3 GiB there; measured here at 4096 too, so the measurement itself is shown
to see quadratic memory when it exists)."""
from __future__ import annotations

import pytest

from megabatch.bench import Case, measure_isolated


def _peak(loss: str, method: str, batch: int) -> float:
    res = measure_isolated(Case(loss, method, batch, 64, "float32", "cpu", repeat=0))  # the peak call only
    assert res.error is None, res.error
    assert res.peak_mib is not None and res.ms is None
    return res.peak_mib


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_memory_is_linear_in_batch(loss):
    small, large = _peak(loss, "torch", 4096), _peak(loss, "torch", 8192)
    dense = _peak(loss, "dense", 4096)  # B^2 floats alone are 64 MiB here, and autograd keeps several
    assert dense > 200, f"the measurement missed the dense matrix ({dense:.0f} MiB)"
    assert large < 3 * max(small, 16.0), f"4096 -> {small:.0f} MiB, 8192 -> {large:.0f} MiB: not linear"
    assert large < 300, f"{large:.0f} MiB at B=8192 (dense takes ~1.3 GiB)"
    assert large < dense, f"chunked at 8192 ({large:.0f} MiB) above dense at 4096 ({dense:.0f} MiB)"
