"""strategy="hierarchical" (a ring between nodes, an all-gather within each) against the float64 reference.

One world of 6 gloo ranks runs it as 3 nodes x 2 ranks and 2 x 3 (ranks_per_node 2 and 3), as 2 x 2
on a subgroup of ranks 0..3 while ranks 4, 5 run one node of 2 (gather-like) on theirs, and as 6 x 1
(ring-like): both losses, uneven and rectangular sizes with ranks that hold no images or no texts,
positives by ids (repeated within and across nodes), CLIP one way, float64 and float32, the torch
and dense backends (and triton, interpreted, where the other distributed tests run it), no-grad and
frozen-image passes, and CLIP under torch.compile(fullgraph=True) (the custom ops). The same world
checks what `_comm.count_bytes()` counts against the formula of the strategy's docstring, and that a
bad or disagreeing ranks_per_node raises ValueError on every rank (explicit, and from torchrun's
LOCAL_WORLD_SIZE / GROUP_RANK), the world working afterwards. A world of 8 compares ring, gather and
hierarchical (2 x 4 and 4 x 2). Convention and tolerance as in tests/test_distributed.py, whose
helpers these cases use.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch

import megabatch as mb
from _dist_utils import run_world
from test_distributed import LOSSES, TRITON_ON_CPU, check_case, compute

SIX = ((3, 1, 0, 4, 2, 5), (2, 3, 4, 0, 1, 2))  # images, texts per rank: uneven, rectangular, empty
SIX_IDS = ((2, 3, 1, 0, 2, 4), (3, 1, 2, 2, 0, 3))


def six_cases() -> list[dict[str, Any]]:
    """Cases for the world of 6, every one run by all 6 ranks."""
    cases = []
    base = dict(dim=9, strategy="hierarchical", big=False, mode="all", backend="torch", dtype=torch.float64)
    for rpn, loss in itertools.product((2, 3), LOSSES):
        cases.append(dict(base, sizes=SIX[0], tsizes=SIX[1], ranks_per_node=rpn, loss=loss, seed=60 + rpn))
        cases.append(dict(base, sizes=SIX[0], tsizes=SIX[1], ranks_per_node=rpn, loss=loss, seed=70 + rpn,
                          dtype=torch.float32, big=True, dim=17))
        cases.append(dict(base, sizes=SIX_IDS[0], tsizes=SIX_IDS[1], ids=4, ranks_per_node=rpn, loss=loss,
                          seed=80 + rpn, backend="dense", directions="image_to_text" if rpn == 2 else "text_to_image"))
    for mode, loss in itertools.product(("nograd", "frozen_x"), LOSSES):
        cases.append(dict(base, sizes=(2, 0, 3, 1, 1, 2), ranks_per_node=3, loss=loss, seed=90, mode=mode))
    for loss in LOSSES:  # one rank per node: a ring
        cases.append(dict(base, sizes=SIX_IDS[0], tsizes=SIX_IDS[1], ids=3, ranks_per_node=1, loss=loss, seed=95))
        if TRITON_ON_CPU:
            cases.append(dict(base, sizes=(3, 1, 0, 2, 2, 1), tsizes=(1, 3, 2, 0, 2, 2), ids=4, ranks_per_node=3,
                              loss=loss, seed=97, backend="triton", dtype=torch.float32))
    return cases


def sub_cases(which: int) -> list[dict[str, Any]]:
    """2 x 2 on group ranks 0..3 (which = 0); one node of 2 on ranks 4, 5 (which = 1)."""
    sizes, tsizes, rpn = [((3, 0, 2, 4), (1, 2, 3, 0), 2), ((2, 3), (4, 0), 2)][which]
    return [dict(sizes=sizes, tsizes=tsizes, ranks_per_node=rpn, dim=7, strategy="hierarchical", loss=loss,
                 dtype=torch.float64, backend="torch", seed=40 + which, big=False, mode="all", ids=ids)
            for loss, ids in itertools.product(LOSSES, (None, 3))]


def sent(loss: str, world: int, rpn: int, n: int, dim: int) -> dict[str, tuple[int, int]]:
    """Bytes and messages one rank sends per pass with n images and texts on every rank, float64
    features, no ids, gloo (the formula of strategies/hierarchical.py; the layout exchange included)."""
    nodes, e = world // rpn, 8
    layout = ((world - 1) * 112, 1)  # 14 int64 to each peer
    p2p_block = lambda width, k: ((nodes - 1) * n * width, (nodes - 1) * k)  # noqa: E731
    p2p_acc = lambda width: (nodes * n * width, nodes) if nodes > 1 else (0, 0)  # noqa: E731
    gather = lambda width, k: (nodes * (rpn - 1) * n * width, nodes * k) if rpn > 1 else (0, 0)  # noqa: E731
    reduce_sum = lambda width: (nodes * 2 * (rpn - 1) * n * width, nodes) if rpn > 1 else (0, 0)  # noqa: E731
    reduce_lse = (nodes * 4 * (rpn - 1) * n * 8, 2 * nodes) if rpn > 1 else (0, 0)
    add = lambda *terms: tuple(sum(t[k] for t in terms) for k in (0, 1))  # noqa: E731
    if loss == "siglip":
        fwd = add(layout, p2p_block(dim * e, 1), p2p_acc(dim * 8), gather(dim * e, 1), reduce_sum(dim * 8))
        return {"fwd": fwd, "bwd": (0, 0)}
    fwd = add(layout, p2p_block(dim * e, 1), p2p_acc(8), gather(dim * e, 1), reduce_lse)
    bwd = add(p2p_block(dim * e + 8, 2), p2p_acc(dim * 8), gather(dim * e + 8, 2), reduce_sum(dim * 8))
    return {"fwd": fwd, "bwd": bwd}


def count_worker(rank: int, world: int) -> dict[tuple[str, int], dict[str, tuple[int, int]]]:
    from megabatch.strategies import _comm

    out = {}
    for loss, rpn in itertools.product(LOSSES, (1, 2, 3, 6)):
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        kw = dict(strategy="hierarchical", ranks_per_node=rpn)
        with _comm.count_bytes() as fwd:
            lo = mb.clip_loss(x, y, 10.0, **kw) if loss == "clip" else mb.siglip_loss(x, y, 10.0, -3.0, **kw)
        with _comm.count_bytes() as bwd:
            lo.backward()
        out[loss, rpn] = {"fwd": tuple(fwd), "bwd": tuple(bwd)}
    return out


def error_worker(rank: int) -> dict[str, Any]:
    """Every rank records what each bad ranks_per_node raised."""
    x = torch.randn(2, 5, requires_grad=True)
    y = torch.randn(3, 5, requires_grad=True)
    errors: dict[str, Any] = {}
    bad = {"differs": 3 if rank == 0 else 2, "divides": 4, "zero": 0, "one_zero": 0 if rank == 5 else 2,
           "type": "2", "not_hierarchical": 2, "env_unset": None, "env_not_contiguous": None}
    env = {"env_not_contiguous": {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(rank // 2 + 1)}}  # not this node
    for kind, rpn in bad.items():
        saved = {k: os.environ.pop(k, None) for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK")}
        os.environ.update(env.get(kind, {}))
        try:
            mb.clip_loss(x, y, 10.0, strategy="ring" if kind == "not_hierarchical" else "hierarchical",
                         ranks_per_node=rpn)
            errors[kind] = None
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            errors[kind] = (type(e).__name__, str(e))
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
    # torchrun's environment, well formed: the same bits as the explicit argument
    os.environ.update(LOCAL_WORLD_SIZE="3", GROUP_RANK=str(rank // 3))
    try:
        from_env = mb.siglip_loss(x, y, 10.0, -3.0, strategy="hierarchical")
    finally:
        del os.environ["LOCAL_WORLD_SIZE"], os.environ["GROUP_RANK"]
    explicit = mb.siglip_loss(x, y, 10.0, -3.0, strategy="hierarchical", ranks_per_node=3)
    return {"errors": errors, "env_equal": bool(torch.equal(from_env, explicit))}


COMPILED = dict(sizes=SIX_IDS[0], tsizes=SIX_IDS[1], ids=4, ranks_per_node=2, dim=9, strategy="hierarchical",
                loss="clip", dtype=torch.float64, backend="torch", seed=99, big=False, mode="all")


def compiled_worker(rank: int) -> dict[str, Any]:
    """COMPILED through torch.compile(fullgraph=True): the custom ops carry ranks_per_node."""
    from test_distributed import _slices, make_inputs

    data = make_inputs(COMPILED, torch.float64)
    rows, cols = _slices(COMPILED["sizes"], rank), _slices(COMPILED["tsizes"], rank)
    x, y = data["x"][rows].clone().requires_grad_(), data["y"][cols].clone().requires_grad_()
    scale = torch.tensor(data["scale"], dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y, s, xi, yi: mb.clip_loss(x, y, s, image_ids=xi, text_ids=yi, strategy="hierarchical",
                                                            ranks_per_node=2, backend="torch"),
                       fullgraph=True, backend="eager")
    loss = fn(x, y, scale, data["image_ids"][rows], data["text_ids"][cols])
    loss.backward()
    return {"loss": loss.detach(), "dx": x.grad, "dy": y.grad, "ds": scale.grad, "db": None, "dtype": loss.dtype,
            "grad_dtypes": {torch.float64}}


def six_worker(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {"cases": [compute(c, rank) for c in six_cases()]}
    groups = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5])]  # every rank creates both
    which = 0 if rank < 4 else 1
    out["sub"] = [compute(c, rank, group=groups[which], pos=rank - 4 * which) for c in sub_cases(which)]
    out["count"] = count_worker(rank, world)
    out["errors"] = error_worker(rank)
    out["compiled"] = compiled_worker(rank)
    out["healthy"] = compute(six_cases()[0], rank)
    return out


def eight_cases() -> list[dict[str, Any]]:
    sizes, tsizes = (3, 1, 0, 4, 2, 5, 1, 2), (2, 3, 4, 0, 1, 2, 2, 1)
    runs = [("ring", None), ("gather", None), ("hierarchical", 4), ("hierarchical", 2)]
    return [dict(sizes=sizes, tsizes=tsizes, dim=8, strategy=s, ranks_per_node=rpn, loss=loss, dtype=torch.float64,
                 backend="torch", seed=88, big=False, mode="all", ids=ids)
            for (s, rpn), loss, ids in itertools.product(runs, LOSSES, (None, 5))]


def eight_worker(rank: int, world: int) -> list[dict[str, Any]]:
    return [compute(c, rank) for c in eight_cases()]


_six: list[Any] = []


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not _six:
        _six.extend(run_world(six_worker, 6, tmp_path_factory.mktemp("six"), timeout=300.0))
    return _six


def test_matches_reference(six) -> None:
    cases = six_cases()
    assert {c["ranks_per_node"] for c in cases} == {1, 2, 3}
    for k, case in enumerate(cases):
        check_case(case, [r["cases"][k] for r in six])


def test_subgroups_and_one_node(six) -> None:
    for which, members in ((0, six[:4]), (1, six[4:])):
        for k, case in enumerate(sub_cases(which)):
            check_case(case, [m["sub"][k] for m in members])


def test_counted_bytes_match_the_formula(six) -> None:
    for r, res in enumerate(six):
        for (loss, rpn), got in res["count"].items():
            assert got == sent(loss, 6, rpn, 4, 5), (r, loss, rpn, got)


def test_bad_ranks_per_node_raise_on_every_rank(six) -> None:
    words = {"differs": "must be the same on every rank", "divides": "must divide the group's 6 ranks",
             "zero": "ranks_per_node must be >= 1", "one_zero": "group rank(s) [5] passed invalid arguments",
             "type": "ranks_per_node must be an int", "not_hierarchical": "only for strategy='hierarchical'",
             "env_unset": "LOCAL_WORLD_SIZE", "env_not_contiguous": "contiguous in the group"}
    for r, res in enumerate(six):
        errs = res["errors"]["errors"]
        assert errs.keys() == words.keys()
        for kind, err in errs.items():
            assert err is not None, f"rank {r}: {kind} did not raise"
            want = "ranks_per_node must be >= 1" if kind == "one_zero" and r == 5 else words[kind]
            assert err[0] == ("TypeError" if kind == "type" else "ValueError") and want in err[1], (r, kind, err)
        assert res["errors"]["env_equal"]
    check_case(six_cases()[0], [res["healthy"] for res in six])


def test_compiled(six) -> None:
    check_case(COMPILED, [r["compiled"] for r in six])


def test_eight_ranks_ring_gather_hierarchical() -> None:
    """W = 8: ring, gather, and hierarchical as 2 x 4 and 4 x 2 all match the float64 reference."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        results = run_world(eight_worker, 8, Path(tmp), timeout=480.0)
    for k, case in enumerate(eight_cases()):
        check_case(case, [r[k] for r in results])
