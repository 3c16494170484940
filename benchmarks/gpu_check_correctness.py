"""Section 1 of benchmarks/gpu_check.py: the `triton` backend against the float64 reference.

Loss and every gradient (features, logit_scale, logit_bias) through the public API
(backend="triton", strategy="local") in bf16, fp16 and fp32, at odd D and over several
super-blocks (B = 20000 > 8192), as relative norm errors against megabatch's float64 reference.
Pass: error <= 2 x max(plain PyTorch's error, the torch backend's error) + a floor per dtype, where
"plain" is the dense loss in the inputs' dtype (the open_clip way), and the result is finite.

The ids path (positives by `image_ids == text_ids`, more texts than images, CLIP's `directions`;
the engine issue's API) runs once `megabatch.clip_loss` takes `image_ids=`; before that it is
reported as "not available in this build". Its plain loss is the issue's definition: cross-entropy
against targets uniform on each row's (column's) positives, over the rows (columns) that have one,
or log-sigmoid with +-1 labels summed over pairs / the number of images; a text whose id matches no
image is a hard negative (no column term, still in every row's normaliser).
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import megabatch as mb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
NOT_AVAILABLE = "not available in this build (megabatch.clip_loss takes no image_ids=)"
Loss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def ids_available() -> bool:
    return "image_ids" in inspect.signature(mb.clip_loss).parameters


def features(b: int, n: int, d: int, dev: str, seed: int) -> tuple[Tensor, Tensor]:
    """float64 (b, D) and (n, D) unit rows; text i < b leans towards image i (a positive-looking pair)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(b, d, device=dev, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, device=dev, generator=g, dtype=torch.float64)
    m = min(b, n)
    y[:m] = 0.6 * x[:m] + 0.8 * y[:m]
    return F.normalize(x, dim=-1), F.normalize(y, dim=-1)


def make_ids(b: int, n: int, dev: str, seed: int) -> tuple[Tensor, Tensor]:
    """Repeated image ids (about 1 in 5 shared); texts: every image id once, then extra captions of
    random images and, for a quarter of the extras, ids no image has (hard negatives)."""
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.randint(0, max(1, 4 * b // 5), (b,), generator=g)
    extra = image_ids[torch.randint(0, b, (n - b,), generator=g)]
    hard = torch.rand(n - b, generator=g) < 0.25
    extra[hard] = b + torch.arange(int(hard.sum()))
    text_ids = torch.cat([image_ids, extra])[torch.randperm(n, generator=g)]
    return image_ids.to(dev), text_ids.to(dev)


def plain(kind: str, x: Tensor, y: Tensor, s: Tensor, b: Tensor, pos: Optional[Tensor] = None,
          directions: str = "both") -> Tensor:
    """The dense loss in the inputs' dtype; pos: (b, n) bool positives (None: the diagonal)."""
    logits = s * x @ y.T
    if pos is None:
        pos = torch.eye(x.shape[0], y.shape[0], dtype=torch.bool, device=x.device)
    if kind == "siglip":
        z = 2 * pos.to(x.dtype) - 1
        return -F.logsigmoid(z * (logits + b)).sum() / x.shape[0]
    terms = []
    for direction, lg, p in (("image_to_text", logits, pos), ("text_to_image", logits.T, pos.T)):
        if directions in ("both", direction):
            has = p.any(1)
            target = p[has].to(lg.dtype)
            terms.append(F.cross_entropy(lg[has], target / target.sum(1, keepdim=True)))
    return sum(terms) / len(terms)


def grads_of(fn: Loss, x: Tensor, y: Tensor, s: float, b: float, dtype: torch.dtype,
             scalar_dtype: torch.dtype) -> list[Optional[Tensor]]:
    dev = x.device
    leaves = [x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_(),
              torch.tensor(s, dtype=scalar_dtype, device=dev, requires_grad=True),
              torch.tensor(b, dtype=scalar_dtype, device=dev, requires_grad=True)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def rel(o: Tensor, r: Tensor, unit: float) -> float:
    return ((o.double() - r.double()).norm() / r.double().norm().clamp_min(unit)).item()


def compare(kind: str, dname: str, x: Tensor, y: Tensor, s: float, bias: float, ours: Loss, base: Loss,
            chunked: Loss, ref: Loss, info: dict[str, Any], strict: bool = False) -> list[dict[str, Any]]:
    """One case: rows of (quantity, err, plain_err, torch_err, tol, ok); CLIP has no d_bias.
    strict (the ids path): the torch backend, too, must be within 2 x plain + floor for the loss and
    the feature gradients (the engine issue's rule for every backend), so that a definition shared
    wrongly by both backends cannot widen the tolerance. The scalar gradients are exempt: they are
    sums that can cancel, where two correct summation orders differ by more than that."""
    dtype = DTYPES[dname]
    r = grads_of(ref, x, y, s, bias, torch.float64, torch.float64)
    p = grads_of(base, x, y, s, bias, dtype, dtype)
    c = grads_of(chunked, x, y, s, bias, dtype, torch.float32)
    o = grads_of(ours, x, y, s, bias, dtype, torch.float32)
    rows = []
    for k, name in enumerate(NAMES):
        if r[k] is None:  # CLIP: no bias gradient
            continue
        unit = 1.0 if name == "loss" else 1e-6
        if o[k] is None:
            rows.append(dict(loss=kind, dtype=dname, **info, quantity=name, ok=False, error="no gradient"))
            continue
        err, pe, te = rel(o[k], r[k], unit), rel(p[k], r[k], unit), rel(c[k], r[k], unit)
        tol = 2 * max(pe, te) + FLOOR[dtype]
        baseline_ok = not strict or name in ("d_scale", "d_bias") or te <= 2 * pe + FLOOR[dtype]
        ok = bool(err <= tol and baseline_ok and torch.isfinite(o[k]).all())
        rows.append(dict(loss=kind, dtype=dname, **info, quantity=name, err=err, plain_err=pe, torch_err=te,
                         tol=tol, ok=ok, **({} if baseline_ok else dict(error="torch backend off plain"))))
    return rows


def api(kind: str, backend: str, **kw: Any) -> Loss:
    if kind == "clip":
        return lambda x, y, s, b: mb.clip_loss(x, y, s, backend=backend, strategy="local", **kw)
    return lambda x, y, s, b: mb.siglip_loss(x, y, s, b, backend=backend, strategy="local", **kw)


def reference(kind: str, **kw: Any) -> Loss:
    if kind == "clip":
        return lambda x, y, s, b: mb.clip_loss_reference(x, y, s, **kw)
    return lambda x, y, s, b: mb.siglip_loss_reference(x, y, s, b, **kw)


def dtype_names(dry: bool) -> list[str]:
    """bf16 first (the benchmarks' dtype), so that a budget cut drops the others; the interpreter has
    no bf16 dot on CPU."""
    return ["fp16", "fp32"] if dry else ["bf16", "fp16", "fp32"]


def standard_cases(dry: bool, dname: str) -> list[tuple[str, str, int, int]]:
    """(loss, dtype, B, D): odd D, EVEN tiles, D = 1152, and 20000 > 8192 (several super-blocks)."""
    sizes = [(7, 17), (40, 33)] if dry else [(1, 3), (7, 17), (300, 129), (4096, 512), (3000, 1152), (20000, 512)]
    return [(kind, dname, b, d) for kind in ("clip", "siglip") for b, d in sizes]


def ids_cases(dry: bool, dname: str) -> list[tuple[str, str, int, int, int, str, str]]:
    """(loss, dtype, b, n, D, mode, directions); mode "ids" (image_ids/text_ids) or "rect" (no ids, n > b);
    in bf16 also b = 9000, n = 12000 (several super-blocks both ways)."""
    small = (20, 28, 17) if dry else (300, 420, 129)
    out = [("clip", dname, *small, "ids", directions) for directions in ("both", "image_to_text", "text_to_image")]
    out += [("clip", dname, *small, "rect", "both"), ("siglip", dname, *small, "ids", "both"),
            ("siglip", dname, *small, "rect", "both")]
    if dname == "bf16" and not dry:
        out += [("clip", "bf16", 9000, 12000, 512, "ids", "both"), ("siglip", "bf16", 9000, 12000, 512, "ids", "both")]
    return out


def one_ids_case(kind: str, dname: str, b: int, n: int, d: int, mode: str, directions: str, dev: str,
                 s: float, bias: float) -> list[dict[str, Any]]:
    x, y = features(b, n, d, dev, seed=b + n + d)
    info = dict(B=b, N=n, D=d, ids=mode, directions=directions)
    if mode == "ids":
        image_ids, text_ids = make_ids(b, n, dev, seed=b + d)
        kw: dict[str, Any] = dict(image_ids=image_ids, text_ids=text_ids)
        pos: Optional[Tensor] = image_ids[:, None] == text_ids[None, :]
    else:
        kw, pos = {}, None
    if kind == "clip":
        kw["directions"] = directions
    base = (lambda x_, y_, s_, b_: plain(kind, x_, y_, s_, b_, pos, directions))
    return compare(kind, dname, x, y, s, bias, api(kind, "triton", **kw), base, api(kind, "torch", **kw),
                   reference(kind, **kw), info, strict=True)


def run(dev: str, dry: bool, deadline: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case until `deadline` (time.time()); returns rows, the ids status and the verdict."""
    log("\n== 1. correctness vs float64 (rel. norm error; tol = 2 x max(plain, torch) + floor) ==")
    rows: list[dict[str, Any]] = []
    stopped = None

    def guarded(label: str, info: dict[str, Any], fn: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            new = fn()
        except Exception as e:  # a compile or launch error is a FAIL of that case, not a crash
            new = [dict(**info, quantity="all", ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")]
        for r in new:
            if not r["ok"] or r["quantity"] == "loss":
                err = f"err {r['err']:.2e} plain {r['plain_err']:.2e} torch {r['torch_err']:.2e}" if "err" in r \
                    else r.get("error", "")
                log(f"{label} {r['quantity']:8} {err} {'ok' if r['ok'] else 'FAIL'}")
        rows.extend(new)
        if dev == "cuda":
            torch.cuda.empty_cache()

    ids_status = "ran" if ids_available() else NOT_AVAILABLE
    if ids_status != "ran":
        log(f"ids path: {ids_status}")
    for dname in dtype_names(dry):
        for kind, _, b, d in standard_cases(dry, dname):
            if time.time() > deadline:
                stopped = "budget"
                break
            s, bias = (30.0, -10.0) if b % 2 else (100.0, -12.0)
            x, y = features(b, b, d, dev, seed=b + d)
            guarded(f"{kind:6} {dname} B={b:<6} D={d:<5}", dict(loss=kind, dtype=dname, B=b, N=b, D=d, ids="none"),
                    lambda: compare(kind, dname, x, y, s, bias, api(kind, "triton"),
                                    lambda *a: plain(kind, *a), api(kind, "torch"), reference(kind),
                                    dict(B=b, N=b, D=d, ids="none", directions="both")))
        for kind, _, b, n, d, mode, directions in ids_cases(dry, dname) if ids_status == "ran" else []:
            if time.time() > deadline:
                stopped = "budget"
                break
            info = dict(loss=kind, dtype=dname, B=b, N=n, D=d, ids=mode, directions=directions)
            guarded(f"{kind:6} {dname} b={b} n={n} D={d} {mode} {directions}", info,
                    lambda: one_ids_case(kind, dname, b, n, d, mode, directions, dev, 30.0, -10.0))
        if stopped:
            break
    bad = [r for r in rows if not r["ok"]]
    log(f"correctness: {len(rows) - len(bad)}/{len(rows)} within tolerance"
        + (f"; stopped by the {stopped} before every case ran" if stopped else ""))
    return dict(rows=rows, ids=ids_status, failed=len(bad), stopped=stopped)
