"""`megabatch study`: why 32k? Held-out retrieval against the contrastive batch size, CLIP and SigLIP,
on real data, at the same number of samples seen; and the losses' memory against the batch.

    megabatch study                      # the full study (`make study`; see README "Why 32k?")
    megabatch study --quick              # a ~1-minute version (the tests run it; ViT, 512 samples a run)
    megabatch study --batches 16 256 --seeds 0 --samples 8192 --output /tmp/s
    megabatch study --data wordnet       # the same question for text (wordnet_study.py; `make study-wordnet`)

Every run trains an image tower from scratch (`--image-tower`: the small CNN by default, 0.59M
parameters; or the small preset's ViT) against locked MiniLM-L6 with a trained linear head (LiT
with the *text* tower locked; `--text-tower minilm --lock-text`) on `--data emoji`: two drawing
styles of ~1,650 concepts (~3,300 pairs), evaluated by retrieving, for each concept drawn in the
unseen third style, its name among all ~1,830 names (image->text R@1; chance 0.05%).
Runs at every batch size see the same number of samples (steps = samples / batch), with the same
learning rate and a warmup of a tenth of the steps. Positives are by caption where the app has
`--positives caption`: a concept's two drawings in one batch are both its name's positives,
not each other's false negatives. The largest batch is bounded by the data (3,292 training pairs),
not by the loss. One point per loss is also trained with the dense loss (backend dense: the whole
B x B matrix) to show the tiled loss's curve is the same.

The memory part measures one loss forward+backward's peak live bytes (the torch CPU allocator's
own events, through the profiler) against the batch, for both losses, dense (backend dense) and
tiled (backend torch), at D = 256 in float32.

Writes OUTPUT/study.json (rows, environment, command, date) and OUTPUT/study.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..config.sections import TrainConfig, from_preset
from .record import PAPER, environment, mean

# Powers of 4 from 16, and 2,048: the data's limit (3,292 training pairs; a batch of 4,096 would hold pairs twice).
# 32,768 samples (~10 epochs; at 16,384 every point stayed at 2-3% R@1): the CNN costs ~10x the ViT's
# time per sample (the ViT study of 65,536 samples is benchmarks/study/vit_65536.json).
FULL = dict(batches=(16, 64, 256, 1024, 2048), seeds=(0, 1), samples=32768, losses=("clip", "siglip"),
            memory_batches=(1024, 2048, 4096, 8192, 16384), check_batch=256, image_tower="cnn")
# The quick study checks the pipeline (tiled = dense, rows, plot): with the ViT, as the CNN's ~10x
# cost per sample (training and evaluating) would double its time in the tests.
QUICK = dict(batches=(16, 64), seeds=(0,), samples=512, losses=("clip", "siglip"), memory_batches=(256, 512),
             check_batch=64, image_tower="vit")
IMAGE_TOWERS = ("cnn", "vit")
LR = 1e-3
MEMORY_DIM = 256



def build_parser() -> argparse.ArgumentParser:
    from megabatch.cli import CommandParser

    first, rest = __doc__.split("\n\n", 1)  # the description is the docstring's whole first paragraph
    p = CommandParser(prog="megabatch study", description=" ".join(first.split()), epilog=rest,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("emoji", "wordnet"), default="emoji", help="emoji (this study) or wordnet "
                   "(text: `megabatch study --data wordnet --help`)")
    p.add_argument("--quick", action="store_true", help="the short version (2 batch sizes, 1 seed, 512 samples)")
    p.add_argument("--batches", type=int, nargs="+", help="global batch sizes (each >= 2; default 16 64 256 1024 "
                   "2048)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per point (each in [0, 2**32 - 1]; default 0 1)")
    p.add_argument("--samples", type=int, help="samples seen by every run (at least the largest batch; default "
                   "32768)")
    p.add_argument("--losses", nargs="+", choices=("clip", "siglip"), help="the losses compared (default both)")
    p.add_argument("--memory-batches", type=int, nargs="*", help="batch sizes of the memory measurement (none: skip)")
    p.add_argument("--no-check", action="store_true", help="skip the dense-loss runs")
    p.add_argument("--no-training", action="store_true", help="only the memory measurement")
    p.add_argument("--lr", type=float, default=LR, help=f"learning rate of every run (a finite number > 0; "
                   f"default {LR:g})")
    p.add_argument("--image-tower", choices=IMAGE_TOWERS, help="the image tower trained (default cnn; vit with "
                   "--quick)")
    p.add_argument("--output", default="benchmarks/study", help="folder for study.json and study.png")
    return p


def _plan(ns: argparse.Namespace) -> dict[str, Any]:
    plan = dict(QUICK if ns.quick else FULL)
    for key in ("batches", "seeds", "samples", "losses", "memory_batches", "image_tower"):
        if getattr(ns, key) is not None:
            plan[key] = tuple(getattr(ns, key)) if isinstance(getattr(ns, key), list) else getattr(ns, key)
    if any(b < 2 for b in plan["batches"]):
        raise ValueError(f"--batches must all be >= 2, got {plan['batches']}")
    if plan["samples"] < max(plan["batches"]):
        raise ValueError(f"--samples ({plan['samples']}) must be at least the largest batch ({max(plan['batches'])})")
    if any(b < 2 for b in plan["memory_batches"]):
        raise ValueError(f"--memory-batches must all be >= 2, got {plan['memory_batches']}")
    from ..config.sections import check_int, check_number

    check_number("--lr", ns.lr, 0.0, low_open=True)
    for seed in plan["seeds"]:
        check_int("--seeds", seed, 0, 2**32 - 1)
    plan["check_batch"] = None if ns.no_check else min(plan["check_batch"], max(plan["batches"]))
    plan["lr"] = ns.lr
    return plan


def run_config(loss: str, batch: int, seed: int, samples: int, lr: float, output: str, backend: str = "auto",
               image_tower: str = "cnn") -> TrainConfig:
    """The TrainConfig of one study run."""
    steps = max(1, samples // batch)
    extra: dict[str, Any] = {}
    if "positives" in {f.name for f in dataclasses.fields(TrainConfig)}:
        extra["positives"] = "caption"
    return from_preset("small", data="emoji", text_tower="minilm", lock_text=True, context_length=16, loss=loss,
                       image_tower=image_tower,
                       batch_size=batch, micro_batch_size=min(batch, 512), steps=steps, lr=lr,
                       warmup_steps=max(1, steps // 10), eval_every=0, log_every=max(1, steps // 20), seed=seed,
                       threads=1, progress=False, backend=backend, output=output, keep_checkpoints=1, **extra)


def train_point(cfg: TrainConfig) -> dict[str, Any]:
    """Train one study run quietly; its row."""
    from ..run.loop import train

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = train(cfg)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"loss": cfg.loss, "batch": cfg.batch_size, "seed": cfg.seed, "steps": cfg.steps,
            "samples": cfg.steps * cfg.batch_size, "backend": cfg.backend, "image_tower": cfg.model.image_tower,
            "positives": cfg.positives,
            "i2t_r1": final["i2t_r1"], "i2t_r5": final["i2t_r5"], "t2i_r1": final["t2i_r1"],
            "zero_shot_concept_top1": final.get("zero_shot_concept_top1"),
            "zero_shot_category_top1": final.get("zero_shot_category_top1"),
            "chance_i2t_r1": final["chance"]["i2t_r1"], "final_loss": last["loss"],
            "logit_scale": last["logit_scale"], "logit_bias": last.get("logit_bias"),
            "collapsed": any(r.get("collapsed") for r in records),
            "non_finite": final.get("non_finite"),  # the model diverged: its metrics are NaN (evaluate.py)
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)][:1],
            "loss_curve": [[r["step"], r["loss"]] for r in records], "seconds": seconds,
            "peak_rss_mb": last["peak_mem_mb"]}


def peak_live_bytes(fn: Any) -> int:
    """Max over time of bytes allocated minus freed by the torch CPU allocator while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def loss_memory(loss: str, backend: str, batch: int, dim: int = MEMORY_DIM) -> dict[str, Any]:
    """Peak live bytes of one forward+backward of `loss` at `batch` x `dim` (float32, CPU), beyond the inputs."""
    import megabatch as mb

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)

    def step() -> None:
        out = (mb.clip_loss(x, y, s, strategy="local", backend=backend) if loss == "clip"
               else mb.siglip_loss(x, y, s, b, strategy="local", backend=backend))
        out.backward()

    step()  # warm up (lazy initialisation outside the measurement)
    times = []
    for _ in range(3):
        x.grad = y.grad = s.grad = b.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    x.grad = y.grad = s.grad = b.grad = None
    peak = peak_live_bytes(step)
    return {"loss": loss, "backend": backend, "batch": batch, "dim": dim, "dtype": "float32",
            "peak_mib": peak / 2**20, "ms": 1000 * sorted(times)[1], "b_squared_fp32_mib": batch * batch * 4 / 2**20}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (loss, batch, backend): the seeds' mean, min and max image->text R@1, steps, mean seconds."""
    out = []
    for key in sorted({(r["loss"], r["batch"], r["backend"]) for r in rows}):
        mine = [r for r in rows if (r["loss"], r["batch"], r["backend"]) == key]
        r1 = [r["i2t_r1"] for r in mine]
        out.append({"loss": key[0], "batch": key[1], "backend": key[2], "seeds": len(mine), "steps": mine[0]["steps"],
                    "i2t_r1_mean": mean(r1), "i2t_r1_min": min(r1), "i2t_r1_max": max(r1),
                    "i2t_r5_mean": mean([r["i2t_r5"] for r in mine]),
                    "seconds_mean": mean([r["seconds"] for r in mine]),
                    "collapsed": sum(bool(r["collapsed"]) for r in mine)})
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw study.png; False (and a warning) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:  # a long study's numbers are in study.json: keep them, say what is missing
        warnings.warn(f"{path.name} not drawn: matplotlib is not installed ({e}); pip install 'megabatch[train]' "
                      "brings it", RuntimeWarning, stacklevel=2)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axm) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in result["rows"] if r["backend"] == "auto"]
    chance = rows[0]["chance_i2t_r1"] if rows else None
    for loss, color in (("clip", "tab:blue"), ("siglip", "tab:red")):
        mine = [r for r in rows if r["loss"] == loss]
        batches = sorted({r["batch"] for r in mine})
        if not batches:
            continue
        for r in mine:
            ax.scatter(r["batch"], 100 * r["i2t_r1"], color=color, s=12, alpha=0.5)
        means = [mean([100 * r["i2t_r1"] for r in mine if r["batch"] == b]) for b in batches]
        ax.plot(batches, means, color=color, marker="o", label=f"{loss} (mean of seeds)")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
    n, tower = result["plan"]["samples"], result["plan"].get("image_tower", "vit").upper()
    ax.set(xscale="log", xlabel="global contrastive batch", ylabel="image->text R@1 (%)",
           title=f"emoji, unseen drawing style; {tower} image tower; {n:,} samples seen per run")
    ax.minorticks_off()
    ax.set_xticks(sorted({r["batch"] for r in rows}) or [1])
    ax.set_xticklabels([str(b) for b in sorted({r["batch"] for r in rows})], rotation=45)
    if rows:
        ax.legend(fontsize=8)
    for (loss, backend), style in {("clip", "dense"): ("tab:blue", "--"), ("clip", "torch"): ("tab:blue", "-"),
                                   ("siglip", "dense"): ("tab:red", "--"),
                                   ("siglip", "torch"): ("tab:red", "-")}.items():
        pts = sorted((m["batch"], m["peak_mib"]) for m in result["memory"] if m["loss"] == loss
                     and m["backend"] == backend)
        if pts:
            axm.plot(*zip(*pts), color=style[0], ls=style[1], marker="o",
                     label=f"{loss} {'dense (B x B)' if backend == 'dense' else 'tiled (megabatch)'}")
    mem = result["memory"]
    axm.set(xscale="log", yscale="log", xlabel="batch", ylabel="peak live MiB (forward+backward)",
            title=f"loss memory beyond the inputs, D = {MEMORY_DIM}, fp32, CPU")
    if mem:
        bs = sorted({m["batch"] for m in mem})
        axm.plot(bs, [b * b * 4 / 2**20 for b in bs], color="gray", ls=":", label="one B x B fp32 matrix")
        axm.minorticks_off()
        axm.set_xticks(bs)
        axm.set_xticklabels([str(b) for b in bs], rotation=45)
    axm.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_partial(out: Path, result: dict[str, Any], total: int) -> None:
    """study.json with the rows so far (`"partial"`: runs done of total), so a long study that is
    stopped keeps what it measured; the finished study overwrites it."""
    (out / "study.json").write_text(json.dumps({**result, "partial": f"{len(result['rows'])} of {total} runs"},
                                               indent=1))


def _data(args: list[str]) -> Optional[str]:
    """The value of --data in args (`--data X` or `--data=X`), or None."""
    for i, arg in enumerate(args):
        if arg == "--data" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--data="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if _data(args) == "wordnet":  # the text study has its own flags (wordnet_study.py)
        from .wordnet_study import main as wordnet_main

        return wordnet_main(args)
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        plan = _plan(ns)
    except ValueError as e:
        parser.error(str(e))
    from ..data.types import DataError

    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"environment": environment(args), "plan": plan, "paper": PAPER, "rows": [],
                              "memory": []}
    t0 = time.perf_counter()
    points = [(loss, b, seed, "auto") for b in plan["batches"] for loss in plan["losses"] for seed in plan["seeds"]]
    if ns.no_training:
        points = []
    elif plan["check_batch"]:
        points += [(loss, plan["check_batch"], plan["seeds"][0], "dense") for loss in plan["losses"]]
    try:
        with tempfile.TemporaryDirectory(prefix="megabatch-study-") as tmp:
            for i, (loss, batch, seed, backend) in enumerate(points):
                cfg = run_config(loss, batch, seed, plan["samples"], plan["lr"], f"{tmp}/{i}", backend,
                                 plan["image_tower"])
                row = train_point(cfg)
                result["rows"].append(row)
                _write_partial(out, result, len(points))
                print(f"[{i + 1}/{len(points)}] {loss:6s} batch {batch:5d} seed {seed} {backend:5s}: "
                      f"i2t R@1 {100 * row['i2t_r1']:5.2f}%  t {row['logit_scale']:6.2f}"
                      + (f" b {row['logit_bias']:6.2f}" if row["logit_bias"] is not None else "")
                      + f"  {row['seconds']:.0f} s" + ("  COLLAPSED" if row["collapsed"] else "")
                      + (f"  NOT FINITE ({row['non_finite']})" if row["non_finite"] else ""), flush=True)
    except DataError as e:
        print(f"megabatch study: error: {e}", file=sys.stderr)
        return 2
    result["train_seconds"] = time.perf_counter() - t0
    for loss in plan["losses"]:
        for backend in ("dense", "torch"):
            for batch in plan["memory_batches"]:
                m = loss_memory(loss, backend, batch)
                result["memory"].append(m)
                print(f"memory {loss:6s} {backend:5s} batch {batch:6d}: {m['peak_mib']:9.1f} MiB", flush=True)
    result["seconds"] = time.perf_counter() - t0
    result["summary"] = summarize(result["rows"])
    (out / "study.json").write_text(json.dumps(result, indent=1))
    drawn = f" and {out / 'study.png'}" if plot(result, out / "study.png") else ""
    print(f"megabatch study: {len(result['rows'])} runs in {result['seconds']:.0f} s; wrote {out / 'study.json'}"
          f"{drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
