"""Distributed strategies (`gather`, `ring`) against the float64 reference on the concatenated batch.

Contract (docs/design.md): with W ranks holding b_r images and n_r texts each (uneven and rectangular
sizes allowed, a rank may hold no images or no texts), rank r returns L_r with mean_r L_r = L (the
loss of the concatenated batch); after L_r.backward() its feature gradients are W * dL/d(its
features), and the mean over ranks of its logit_scale / logit_bias gradients is dL/ds, dL/dbias;
for SigLIP each rank's scale/bias gradient is exactly dL_r/ds, dL_r/dbias and L_r = W/B * (its rows'
terms); for CLIP, L_r = W * (w_r * its rows' terms + w_c * its columns' terms). Positives are the
default (text i of the same rank) or given by global ids, repeated within and across ranks; CLIP
runs both ways and one way. Checked for W = 1..4, both losses, both strategies, float64 and float32 (and
bfloat16/float16 at W = 2), the 'torch', 'dense' and (W = 2 and 3, interpreted) 'triton' backends,
gather's NCCL reduce-scatter path (driven on gloo), uneven sizes with a rank of b = 1, no-grad /
frozen-image / scaled-loss backward, a subgroup (4 ranks in two groups of 2), strategy="auto"
(the cost model's pick, on both roads), and ranks disagreeing on D, dtype, backend, requires_grad, ids given, directions, the
strategy (ring / gather / hierarchical), the loss (clip / siglip) or gather's CLIP road (compiled on one
rank only) -- or a global batch without images, or one rank whose own arguments are malformed -- all
raising ValueError on every rank of a world of 2 and of 3 (the world still working afterwards).
Tolerance: tests/_tolerance.py's rule, 2x plain PyTorch's error at the same precision + a floor.
Each world is spawned once (module-scoped) and runs many cases; results come back through files.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import megabatch as mb
from _dist_utils import run_world
from _tolerance import FLOOR, rel_err

STRATEGIES = ("gather", "ring")
# The gloo workers hold CPU tensors: the triton backend runs on them only through the interpreter
# (conftest.py turns it on where there is no GPU). On a GPU machine those cases are left out, and
# test_triton_cases_run says so with a skip.
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
LOSSES = ("clip", "siglip")
# Two layouts per world size: the first uneven (with b = 1 where W > 1), the second another mix.
SIZES = {1: [(7,), (1,)], 2: [(5, 1), (4, 4)], 3: [(6, 2, 5), (1, 3, 3)], 4: [(3, 1, 7, 2), (2, 2, 2, 2)]}
MODES = ("all", "nograd", "frozen_x", "scaled")
MISMATCHES = ("dim", "dtype", "grad", "backend", "empty", "malformed", "ids", "directions")
# Ranks calling different strategies or losses: (what, most ranks, the odd rank, with).
DISAGREEMENTS = [("strategy", a, b, loss) for (a, b), loss in itertools.product(
    [("ring", "gather"), ("ring", "hierarchical"), ("gather", "hierarchical")], LOSSES)]
DISAGREEMENTS += [("loss", "clip", "siglip", s) for s in ("gather", "ring", "hierarchical")]


def make_inputs(case: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Deterministic global features and ids (same values in the parent and in every worker).

    Without ids the positives are image i <-> text i of each rank (i < min(b_r, n_r)): explicit
    global ids that say exactly that are returned for the reference."""
    sizes, tsizes = case["sizes"], case.get("tsizes") or case["sizes"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(sum(sizes), case["dim"], generator=gen, dtype=torch.float64)
    y = 1.5 * torch.randn(sum(tsizes), case["dim"], generator=gen, dtype=torch.float64)
    for r, (b, n) in enumerate(zip(sizes, tsizes)):  # correlated positives
        i0, j0, m = sum(sizes[:r]), sum(tsizes[:r]), min(b, n)
        y[j0 : j0 + m] += x[i0 : i0 + m]
    if case["big"]:  # unnormalised: logits in the hundreds
        x, y, scale, bias = 3 * x, 3 * y, 7.0, -10.0
    else:
        x, y, scale, bias = F.normalize(x, dim=1), F.normalize(y, dim=1), 20.0, -3.0
    if case.get("ids"):
        image_ids = torch.randint(0, case["ids"], (sum(sizes),), generator=gen)
        text_ids = torch.randint(0, case["ids"], (sum(tsizes),), generator=gen)
    else:
        image_ids = torch.cat([1000 * r + torch.arange(b) for r, b in enumerate(sizes)])
        text_ids = torch.cat([torch.where(torch.arange(n) < b, 1000 * r + torch.arange(n), -1 - j0 - torch.arange(n))
                              for r, (b, n, j0) in enumerate(zip(sizes, tsizes, (sum(tsizes[:q]) for q in range(len(sizes)))))])
    return {"x": x.to(dtype), "y": y.to(dtype), "scale": scale, "bias": bias, "image_ids": image_ids,
            "text_ids": text_ids}


def make_cases(world: int) -> list[dict[str, Any]]:
    cases = []
    for k, sizes in enumerate(SIZES[world]):
        dim = (17, 3)[k]
        for strategy, loss, dtype in itertools.product(STRATEGIES, LOSSES, (torch.float64, torch.float32)):
            backend = "dense" if (k == 1 and dtype == torch.float64) else "torch"
            cases.append(dict(sizes=sizes, dim=dim, strategy=strategy, loss=loss, dtype=dtype, backend=backend,
                              seed=100 * world + 10 * k + len(cases), big=k == 1, mode="all"))
    # Rectangles, ids repeated within and across ranks, one-way CLIP, ranks without images or texts.
    beyond = {1: [((5,), (9,), 3, "image_to_text"), ((6,), (4,), None, "text_to_image")],
              2: [((5, 2), (7, 3), None, "both"), ((4, 3), (2, 6), 4, "both")],
              3: [((4, 0, 3), (2, 5, 0), 4, "image_to_text"), ((3, 0, 2), (0, 4, 3), None, "both")],
              4: [((3, 1, 4, 2), (5, 2, 1, 3), 5, "text_to_image"), ((2, 2, 2, 2), (3, 3, 1, 2), 3, "both")]}[world]
    for k, (sizes, tsizes, ids, directions) in enumerate(beyond):
        for strategy, loss in itertools.product(STRATEGIES, LOSSES):
            cases.append(dict(sizes=sizes, tsizes=tsizes, ids=ids, directions=directions, dim=11, strategy=strategy,
                              loss=loss, dtype=torch.float32 if k else torch.float64, backend="torch",
                              seed=500 + 10 * world + k, big=False, mode="all"))
    if world == 2:  # half precisions travel as they are; accumulation stays float32
        for strategy, loss, dtype in itertools.product(STRATEGIES, LOSSES, (torch.bfloat16, torch.float16)):
            cases.append(dict(sizes=(6, 3), dim=17, strategy=strategy, loss=loss, dtype=dtype, backend="torch",
                              seed=31, big=False, mode="all"))
        for strategy, loss in itertools.product(STRATEGIES, LOSSES):  # ids: in bfloat16, and the dense oracle
            cases.append(dict(sizes=(6, 3), tsizes=(8, 2), ids=4, dim=17, strategy=strategy, loss=loss,
                              dtype=torch.bfloat16, backend="torch", seed=33, big=False, mode="all"))
            cases.append(dict(sizes=(4, 3), tsizes=(5, 2), ids=3, directions="image_to_text", dim=9,
                              strategy=strategy, loss=loss, dtype=torch.float64, backend="dense", seed=35, big=True,
                              mode="all"))
        for strategy, loss in itertools.product(STRATEGIES, LOSSES):  # the fused kernels (interpreted on CPU)
            if TRITON_ON_CPU:
                cases.append(dict(sizes=(5, 2), dim=17, strategy=strategy, loss=loss, dtype=torch.float32,
                                  backend="triton", seed=37, big=True, mode="all"))
    if world == 3 and TRITON_ON_CPU:  # the fused kernels with uneven, rectangular ranks and repeated ids
        for strategy, loss in itertools.product(STRATEGIES, LOSSES):
            cases.append(dict(sizes=(4, 1, 6), tsizes=(6, 2, 3), ids=5, dim=19, strategy=strategy, loss=loss,
                              dtype=torch.float32, backend="triton", seed=41, big=False, mode="all"))
    if world == 3:  # gradient modes that change which collectives run
        for mode, strategy, loss in itertools.product(MODES[1:], STRATEGIES, LOSSES):
            cases.append(dict(sizes=(2, 4, 1), dim=5, strategy=strategy, loss=loss, dtype=torch.float64,
                              backend="torch", seed=7, big=False, mode=mode))
    return cases


def _slices(sizes: tuple[int, ...], r: int) -> slice:
    return slice(sum(sizes[:r]), sum(sizes[: r + 1]))


def compute(case: dict[str, Any], rank: int, group: Any = None, pos: int | None = None) -> dict[str, Any]:
    """One rank's loss and gradients for `case`; `pos` is this rank's place in `group` (default: rank)."""
    data = make_inputs(case, case["dtype"])
    pos = rank if pos is None else pos
    rows, cols = _slices(case["sizes"], pos), _slices(case.get("tsizes") or case["sizes"], pos)
    mode = case["mode"]
    x = data["x"][rows].clone().requires_grad_(mode != "frozen_x")
    y = data["y"][cols].clone().requires_grad_()
    scale = torch.tensor(data["scale"], dtype=case["dtype"], requires_grad=True)
    bias = torch.tensor(data["bias"], dtype=case["dtype"], requires_grad=True)
    kw = dict(strategy=case["strategy"], backend=case["backend"], group=group)
    if case.get("ranks_per_node"):  # strategy="hierarchical" (tests/test_hierarchical.py)
        kw.update(ranks_per_node=case["ranks_per_node"])
    if case.get("ids"):
        kw.update(image_ids=data["image_ids"][rows], text_ids=data["text_ids"][cols])
    with torch.set_grad_enabled(mode != "nograd"):
        if case["loss"] == "clip":
            loss = mb.clip_loss(x, y, scale, directions=case.get("directions", "both"), **kw)
        else:
            loss = mb.siglip_loss(x, y, scale, bias, **kw)
    if mode != "nograd":
        (3.0 * loss if mode == "scaled" else loss).backward()
    grad = lambda t: None if t.grad is None else t.grad.double()  # noqa: E731
    return {"loss": loss.detach().double(), "dx": grad(x), "dy": grad(y), "ds": grad(scale), "db": grad(bias),
            "dtype": loss.dtype, "grad_dtypes": {t.grad.dtype for t in (x, y, scale, bias) if t.grad is not None}}


def _ce_terms(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy against a target uniform on the row's positives (0 where it has none),
    and which rows have one."""
    has = mask.any(1)
    target = mask.to(logits.dtype) / mask.sum(1, keepdim=True).clamp_min(1).to(logits.dtype)
    return -(target * F.log_softmax(logits, dim=1)).sum(1) * has, has


def per_rank_losses(case: dict[str, Any], logits: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """L_r = W (w_r * rank r's row terms + w_c * its column terms) for CLIP, W/B (its row terms) for SigLIP."""
    sizes, tsizes = case["sizes"], case.get("tsizes") or case["sizes"]
    world = len(sizes)
    out = []
    if case["loss"] == "siglip":
        rows = -F.logsigmoid((2 * mask.to(logits.dtype) - 1) * (logits + bias)).sum(1)
        return [world / sum(sizes) * rows[_slices(sizes, r)].sum() for r in range(world)]
    rows, has_r = _ce_terms(logits, mask)
    cols, has_c = _ce_terms(logits.T, mask.T)
    direction = case.get("directions", "both")
    w_r = {"both": 0.5, "image_to_text": 1.0, "text_to_image": 0.0}[direction] / has_r.sum().to(logits.dtype)
    w_c = {"both": 0.5, "image_to_text": 0.0, "text_to_image": 1.0}[direction] / has_c.sum().to(logits.dtype)
    for r in range(world):
        out.append(world * (w_r * rows[_slices(sizes, r)].sum() + w_c * cols[_slices(tsizes, r)].sum()))
    return out


def reference(case: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Global and per-rank losses and gradients, computed plainly with autograd in `dtype`."""
    data = make_inputs(case, case["dtype"])
    world = len(case["sizes"])
    x = data["x"].to(dtype).requires_grad_()
    y = data["y"].to(dtype).requires_grad_()
    scale = torch.tensor(data["scale"], dtype=dtype, requires_grad=True)
    bias = torch.tensor(data["bias"], dtype=dtype, requires_grad=True)
    mask = data["image_ids"][:, None] == data["text_ids"][None, :]
    per_rank = per_rank_losses(case, scale * x @ y.T, bias, mask)
    out: dict[str, Any] = {"per_rank": [p.detach().double() for p in per_rank]}
    if case["loss"] == "siglip":  # each rank's scale/bias gradient is dL_r/ds exactly
        out["ds_r"] = [torch.autograd.grad(p, scale, retain_graph=True)[0].double() for p in per_rank]
        out["db_r"] = [torch.autograd.grad(p, bias, retain_graph=True)[0].double() for p in per_rank]
    total = sum(per_rank) / world
    total.backward()
    if dtype == torch.float64:  # the per-rank split sums to the library's own reference loss
        ids = dict(image_ids=data["image_ids"], text_ids=data["text_ids"])
        lib = mb.clip_loss_reference(x, y, scale, directions=case.get("directions", "both"), **ids) \
            if case["loss"] == "clip" else mb.siglip_loss_reference(x, y, scale, bias, **ids)
        assert torch.allclose(total, lib, rtol=1e-12)
    out.update(loss=total.detach().double(), dx=world * x.grad.double(), dy=world * y.grad.double(),
               ds=scale.grad.double(), db=None if bias.grad is None else bias.grad.double())
    return out


def error_sizes(case: dict[str, Any]) -> dict[str, Any]:
    """What each error is measured against (see _tolerance.py): the scalar gradients sum_ij G_ij M_ij
    (resp. G_ij) can cancel far below their terms, so they are measured against sum |G_ij M_ij|."""
    data = make_inputs(case, torch.float64)
    x, y = data["x"].double(), data["y"].double()
    m = x @ y.T
    logits = (data["scale"] * m).requires_grad_()
    bias = torch.tensor(data["bias"], dtype=torch.float64)
    per_rank = per_rank_losses(case, logits, bias, data["image_ids"][:, None] == data["text_ids"][None, :])
    (g,) = torch.autograd.grad(sum(per_rank) / len(per_rank), logits)
    world = len(per_rank)
    stripe = lambda t, r: world * t[_slices(case["sizes"], r)].abs().sum()  # noqa: E731
    return {"ds": (g * m).abs().sum(), "db": g.abs().sum(),
            "ds_r": [stripe(g * m, r) for r in range(world)], "db_r": [stripe(g, r) for r in range(world)]}


def check_case(case: dict[str, Any], got: list[dict[str, Any]]) -> None:
    """Compare every rank's result for `case` with the float64 reference under the convention."""
    dtype, mode, world = case["dtype"], case["mode"], len(got)
    ref, sizes = reference(case, torch.float64), error_sizes(case)
    plain = reference(case, dtype) if dtype != torch.float64 else None
    factor = 3.0 if mode == "scaled" else 1.0

    def close(name: str, value: torch.Tensor, key: str, r: int | None = None, factor: float = 1.0) -> None:
        pick = (lambda d: d[key]) if r is None else (lambda d: d[key][r])  # noqa: E731
        want = factor * pick(ref)
        denom = float(want.norm())
        if key in sizes:
            denom = max(denom, factor * float(pick(sizes)))
        bound = FLOOR[dtype] + (2 * rel_err(pick(plain), pick(ref), denom / factor) if plain is not None else 0.0)
        err = rel_err(value, want, denom)
        assert err <= bound, f"{case}: {name} relative error {err:.2e} > {bound:.2e}"

    assert all(g["dtype"] == (torch.float64 if dtype == torch.float64 else torch.float32) for g in got)
    assert all(g["grad_dtypes"] <= {dtype} for g in got), "gradients must come back in the inputs' dtype"
    close("mean loss", torch.stack([g["loss"] for g in got]).mean(), "loss")
    for r, g in enumerate(got):
        close(f"L_{r}", g["loss"], "per_rank", r)
    if mode == "nograd":
        assert all(g[k] is None for g in got for k in ("dx", "dy", "ds", "db"))
        return
    if mode == "frozen_x":
        assert all(g["dx"] is None for g in got)
    else:
        close("W * dL/dx", torch.cat([g["dx"] for g in got]), "dx", factor=factor)
    close("W * dL/dy", torch.cat([g["dy"] for g in got]), "dy", factor=factor)
    close("mean dL/ds", torch.stack([g["ds"] for g in got]).mean(), "ds", factor=factor)
    if case["loss"] == "siglip":
        close("mean dL/dbias", torch.stack([g["db"] for g in got]).mean(), "db", factor=factor)
        for r, g in enumerate(got):
            close(f"dL_{r}/ds", g["ds"], "ds_r", r, factor)
            close(f"dL_{r}/dbias", g["db"], "db_r", r, factor)
    else:
        assert all(g["db"] is None for g in got)


# ----------------------------------------------------------------------------- worker functions


def world_worker(rank: int, world: int) -> dict[str, Any]:
    """All of a world's cases; worlds 2, 3, 4 also run the auto, mismatch and subgroup checks
    (process start-up, not the cases, is what costs time on a small machine)."""
    out: dict[str, Any] = {"cases": [compute(c, rank) for c in make_cases(world)]}
    if world == 2:  # strategy="auto": the cost model's pick, the same on every rank, with its exact bits
        out["auto"] = auto_worker(rank)
    if world >= 3:  # gather's NCCL path (padded reduce-scatter), which gloo also has on torch 2.13
        from megabatch.strategies import _comm

        default, _comm.use_reduce_scatter = _comm.use_reduce_scatter, lambda t, lay: True
        out["reduce_scatter"] = [compute(c, rank) for c in make_cases(world) if c["strategy"] == "gather"]
        _comm.use_reduce_scatter = default
    if world in (2, 3):
        out["mismatch"] = mismatch_worker(rank, world)
    if world == 4:
        out["subgroups"] = subgroup_worker(rank)
    return out


def auto_worker(rank: int) -> dict[str, Any]:
    """What strategy="auto" picks at a world-2 case: with this machine's rates and free memory, with a budget of
    one byte (no peak fits: the least peak), and with hops made free (the pick follows the rates); then the
    loss through auto and through the strategy it named, on the eager road (clip_loss) and the compiled one
    (losses.ops.clip: its backward rebuilds the strategy from the sizes alone)."""
    import dataclasses

    from megabatch import strategies
    from megabatch.cost import pick as pick_module
    from megabatch.kernels import get_backend
    from megabatch.losses import ops
    from megabatch.spec import loss_spec

    case = dict(make_cases(2)[0], strategy="auto", loss="clip")
    data = make_inputs(case, case["dtype"])
    x, y = data["x"][_slices(case["sizes"], rank)], data["y"][_slices(case["sizes"], rank)]
    scale = torch.tensor(data["scale"], dtype=case["dtype"])
    kernels = get_backend(case["backend"], x.device)

    def pick(x: torch.Tensor, y: torch.Tensor, **budget: Any) -> Any:
        return strategies.create(strategies.make_spec("auto", None, **budget), x, y, (scale,), kernels, None,
                                 loss="clip", ids=False).lay

    # auto decides once per shape of call: each pick below on a shape of its own (a row fewer a rank each)
    real = pick(x[2:], y[2:])  # this machine's rates (cost.CPU): at W = 2, the ring's fewer hops win
    tight = pick(x[1:], y[1:], memory_budget=1)
    default, pick_module.CPU = pick_module.CPU, dataclasses.replace(pick_module.CPU, latency=0.0)
    try:  # hops for free: gather's one visit wins, and the full shape's calls below all take it
        lay = pick(x, y)
    finally:
        pick_module.CPU = default
    out: dict[str, Any] = {"spec": strategies.make_spec("auto", None).name, "name": lay.strategy,
                           "reason": lay.choice.reason, "tight": tight.strategy, "tight_reason": tight.choice.reason,
                           "real": real.strategy, "real_reason": real.choice.reason}
    out["auto"] = compute(case, rank)
    out["named"] = compute(dict(case, strategy=lay.strategy), rank)

    def road(name: str) -> list[torch.Tensor]:
        xd, yd = x.clone().requires_grad_(), y.clone().requires_grad_()
        s = scale.clone().requires_grad_()
        spec, (s_,) = loss_spec("clip", xd, yd, [("logit_scale", s)], image_ids=None, text_ids=None, strategy=name,
                                backend=kernels)
        loss = ops.clip(spec, xd, yd, s_)
        loss.backward()
        return [loss.detach(), xd.grad, yd.grad, s.grad]

    out["compiled_auto"], out["compiled_named"] = road("auto"), road(lay.strategy)
    return out


def subgroup_worker(rank: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates both
    mine, pos = groups[rank % 2], rank // 2
    results = []
    for case in subgroup_cases(rank % 2):
        results.append(compute(case, rank, group=mine, pos=pos))
    return results


def subgroup_cases(which: int) -> list[dict[str, Any]]:
    sizes = [(3, 5), (1, 4)][which]
    return [dict(sizes=sizes, dim=17, strategy=s, loss=l, dtype=d, backend="torch", seed=50 + which, big=False,
                 mode="all") for s, l, d in itertools.product(STRATEGIES, LOSSES, (torch.float64, torch.float32))]


def _error(call: Any) -> Any:
    """(exception type name, message) of what call() raised, None if it returned."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the parent checks type and message
        return type(e).__name__, str(e)
    return None


def mismatch_worker(rank: int, world: int) -> dict[str, Any]:
    """Every rank records the exception each disagreement raised, then runs one healthy case: the
    group survives a ValueError raised after the layout exchange. In DISAGREEMENTS' case k, rank
    k % world is the one that differs."""
    errors = {}
    for kind, strategy, loss in itertools.product(MISMATCHES, (*STRATEGIES, "hierarchical"), LOSSES):
        dim = 16 if kind == "dim" and rank == 1 else 17
        dtype = torch.float64 if kind == "dtype" and rank == world - 1 else torch.float32
        b = 0 if kind == "empty" else 2 + rank  # no rank has an image left: no global batch
        x = torch.randn(b, dim, dtype=dtype, requires_grad=not (kind == "grad" and rank == 0))
        if kind == "malformed" and rank == 1:  # fails this rank's own validation, before any collective
            x = x[:, 0]
        y = torch.randn(2 + rank, dim, dtype=dtype, requires_grad=True)
        kw: dict[str, Any] = dict(strategy=strategy, backend="dense" if kind == "backend" and rank == 1 else "torch",
                                  ranks_per_node=1 if strategy == "hierarchical" else None)
        if kind == "ids" and rank == 1:
            kw.update(image_ids=torch.zeros(x.shape[0], dtype=torch.int64), text_ids=torch.zeros(3, dtype=torch.int64))
        if loss == "clip" or kind == "directions":
            direction = "image_to_text" if kind == "directions" and rank == 0 else "both"
            errors[kind, strategy, loss] = _error(lambda: mb.clip_loss(x, y, 10.0, directions=direction, **kw))
        else:
            errors[kind, strategy, loss] = _error(lambda: mb.siglip_loss(x, y, 10.0, -5.0, **kw))
    x = torch.randn(2 + rank, 17, requires_grad=True)
    y = torch.randn(3, 17, requires_grad=True)
    for k, (what, usual, odd, other) in enumerate(DISAGREEMENTS):
        mine = odd if rank == k % world else usual
        strategy, loss = (mine, other) if what == "strategy" else (other, mine)
        kw = dict(strategy=strategy, backend="torch", ranks_per_node=1 if strategy == "hierarchical" else None)
        call = (lambda: mb.clip_loss(x, y, 10.0, **kw)) if loss == "clip" else \
            (lambda: mb.siglip_loss(x, y, 10.0, -5.0, **kw))
        errors[what, usual, odd, other] = _error(call)
    # gather's compiled CLIP backward gathers the texts again: the compiled road on rank 0 only must raise;
    # ring's roads run the same collectives, so there they mix (and give the eager value). The compiled
    # road is losses.ops.clip, what torch.compile's graph calls (tests/test_compile.py), called here directly.
    from megabatch.losses import ops
    from megabatch.losses import clip as eager_clip
    from megabatch.spec import loss_spec

    road: dict[str, Any] = {}
    for strategy in STRATEGIES:
        xd, yd = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
        opts, (scale,) = loss_spec("clip", xd, yd, [("logit_scale", torch.tensor(10.0, dtype=torch.float64))],
                                   image_ids=None, text_ids=None, strategy=strategy, backend="torch",
                                   ranks_per_node=1 if strategy == "hierarchical" else None)
        fn = ops.clip if rank == 0 else eager_clip
        road[strategy] = _error(lambda: fn(opts, xd, yd, scale).backward())
        if road[strategy] is None:
            road[strategy + "_value"] = (float(fn(opts, xd, yd, scale).detach()),
                                          float(eager_clip(opts, xd, yd, scale).detach()))
    return {"errors": errors, "road": road, "healthy": compute(make_cases(world)[0], rank)}


# ----------------------------------------------------------------------------- tests

_worlds: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def world_results(tmp_path_factory: pytest.TempPathFactory):
    def get(world: int) -> list[dict[str, Any]]:
        if world not in _worlds:
            _worlds[world] = run_world(world_worker, world, tmp_path_factory.mktemp(f"world{world}"))
        return _worlds[world]

    return get


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference(world: int, world_results) -> None:
    results = world_results(world)
    cases = make_cases(world)
    assert all(len(r["cases"]) == len(cases) for r in results)
    for k, case in enumerate(cases):
        check_case(case, [r["cases"][k] for r in results])


def test_triton_cases_run() -> None:
    if not TRITON_ON_CPU:
        pytest.skip("GPU machine: the gloo workers' CPU tensors cannot use the triton backend without the interpreter")
    assert sum(c["backend"] == "triton" for w in (2, 3) for c in make_cases(w)) == 8
    assert sum(c["backend"] == "triton" and bool(c.get("ids")) for c in make_cases(3)) == 4


@pytest.mark.parametrize("world", [3, 4])
def test_gather_reduce_scatter_path(world: int, world_results) -> None:
    results = world_results(world)
    cases = [c for c in make_cases(world) if c["strategy"] == "gather"]
    assert all(len(r["reduce_scatter"]) == len(cases) > 0 for r in results)
    for k, case in enumerate(cases):
        check_case(case, [r["reduce_scatter"][k] for r in results])


def test_auto_is_the_cost_models_pick(world_results) -> None:
    """On this CPU (cost.CPU: 110 us a hop) and a handful of rows, the model picks the ring (fewer hops than
    gather's collectives); with no room for any peak, the least peak (gather's, at W = 2: N = 2n, and no
    gx buffer); with free hops, gather. Every
    rank picks the same, and auto's loss and gradients are the named strategy's bits, on both roads."""
    results = [r["auto"] for r in world_results(2)]
    assert [r["spec"] for r in results] == ["auto", "auto"]  # decided at the call, not before
    for key, name in (("real", "ring"), ("tight", "gather"), ("name", "gather")):
        assert [r[key] for r in results] == [name, name], key
    reasons = {key: {r[k] for r in results} for key, k in (("real", "real_reason"), ("tight", "tight_reason"),
                                                           ("name", "reason"))}
    assert all(len(v) == 1 for v in reasons.values()), reasons  # every rank's reason is the same
    assert reasons["real"].pop().startswith("ring: the fastest predicted on CPU rates")
    assert "no candidate's peak fits the memory budget of 0.0 MiB" in reasons["tight"].pop()
    assert reasons["name"].pop().startswith("gather: the fastest predicted on CPU rates")
    for r in results:
        for key in ("loss", "dx", "dy", "ds"):
            assert torch.equal(r["auto"][key], r["named"][key]), key
        for a, b in zip(r["compiled_auto"], r["compiled_named"]):
            assert torch.equal(a, b)


def test_subgroups(world_results) -> None:
    results = [r["subgroups"] for r in world_results(4)]
    for which in (0, 1):
        members = [results[which], results[which + 2]]  # global ranks of group `which`, in group order
        for k, case in enumerate(subgroup_cases(which)):
            check_case(case, [m[k] for m in members])


@pytest.mark.parametrize("world", [2, 3])
def test_disagreeing_ranks_raise_everywhere(world: int, world_results) -> None:
    results = [r["mismatch"] for r in world_results(world)]
    words = {"dim": "feature dim D", "dtype": "same dtype", "grad": "need gradients", "backend": "same backend",
             "empty": "at least one image and one text", "malformed": "group rank(s) [1] passed invalid arguments",
             "ids": "on every rank or on none", "directions": "directions must be the same on every rank"}
    for r, res in enumerate(results):
        assert len(res["errors"]) == len(MISMATCHES) * (len(STRATEGIES) + 1) * len(LOSSES) + len(DISAGREEMENTS)
        for key, err in res["errors"].items():
            assert err is not None, f"rank {r}: {key} mismatch did not raise"
            if key[0] in ("strategy", "loss"):
                continue
            kind = key[0]
            expected = "image_features must be 2-D" if kind == "malformed" and r == 1 else words[kind]
            assert err[0] == "ValueError" and expected in err[1], (r, key, err)
    for k, (what, usual, odd, other) in enumerate(DISAGREEMENTS):
        names = [odd if r == k % world else usual for r in range(world)]
        if what == "strategy":
            want = f"every rank of the group must use the same strategy; got {names} on ranks 0..{world - 1}"
        else:
            names = [f"{name}_loss" for name in names]
            want = f"every rank of the group must call the same loss; got {names} on ranks 0..{world - 1}"
        assert [res["errors"][what, usual, odd, other] for res in results] == [("ValueError", want)] * world
    compiled = [True] + [False] * (world - 1)
    want = ("strategy='gather' with clip_loss needs torch.compile on every rank or on none (the compiled backward "
            f"gathers the texts again); compiled per rank 0..{world - 1}: {compiled}")
    assert [res["road"]["gather"] for res in results] == [("ValueError", want)] * world
    for r, res in enumerate(results):
        assert res["road"]["ring"] is None, (r, res["road"]["ring"])
        mixed, eager = res["road"]["ring_value"]
        assert abs(mixed - eager) <= 1e-12 * abs(eager), (r, mixed, eager)
    check_case(make_cases(world)[0], [res["healthy"] for res in results])
