"""sentence-transformers' CachedMNRL (gather_across_devices) against MegabatchLoss, side by side.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/st_side_by_side.py \
        [--part megabatch|cached_mnrl|alone] [--batch 256] [--mini 32] [--steps 4] [--alone 4096]

--part megabatch / cached_mnrl trains the same tiny random BertModel (tests/_st_models.py, width
16) with that loss on the same random (anchor, positive) texts, per-rank batch --batch, GradCache
mini-batch --mini, one-way, on gloo CPU ranks under SentenceTransformerTrainer, and prints (rank 0)
the median seconds per step after the first and the rise of this process's peak resident memory
(ru_maxrss) over its level before training: a coarse, CPU-only measure, so run each part in its own
process. --part alone measures the loss's arithmetic alone (forward and backward on random (--alone,
384) embeddings a rank, no model): megabatch first, from the level after the imports, then
sentence-transformers' MNRL, whose figure is its rise above megabatch's peak (a lower bound).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import _st_models  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from megabatch.integrations.sentence_transformers import MegabatchLoss  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def make(name: str, model, mini: int):
    if name == "cached_mnrl":
        return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini, gather_across_devices=True)
    return MegabatchLoss(model, mini_batch_size=mini)


def loss_alone(name: str, b: int, dim: int) -> float:
    """Peak resident rise (MiB) of the loss on random (b, dim) embeddings per rank, forward + backward."""
    g = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(b, dim, generator=g).requires_grad_()
    d = torch.randn(b, dim, generator=g).requires_grad_()
    before = rss_mib()
    if name == "cached_mnrl":
        inner = st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), gather_across_devices=True)
        loss = inner.compute_loss_from_embeddings([q, d], None)
    else:
        import megabatch as mb

        qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
        loss = mb.clip_loss(qn, dn, 20.0, directions="image_to_text")
    loss.backward()
    return rss_mib() - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("megabatch", "cached_mnrl", "alone"), default="megabatch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mini", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--alone", type=int, default=4096, help="per-rank batch of the loss-alone measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.part == "alone":
        dist.init_process_group("gloo")
        alone = {name: loss_alone(name, args.alone, 384) for name in ("megabatch", "cached_mnrl")}
        if rank == 0:
            print(f"W={world} loss alone, {args.alone} rows a rank, D=384: peak RSS rise megabatch "
                  f"{alone['megabatch']:.1f} MiB, MNRL (gather) >= {alone['cached_mnrl']:.1f} MiB")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = _st_models.build(os.path.join(tmp, f"m{rank}"))
            n = args.batch * world * args.steps
            data = Dataset.from_dict({"anchor": _st_models.sentences(n, 1), "positive": _st_models.sentences(n, 2)})
            clock = Clock()
            targs = SentenceTransformerTrainingArguments(
                output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                learning_rate=1e-4, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0, logging_steps=args.steps)
            before = rss_mib()
            SentenceTransformerTrainer(model=model, args=targs, train_dataset=data,
                                       loss=make(args.part, model, args.mini), callbacks=[clock]).train()
            rise = rss_mib() - before
        if rank == 0:
            print(f"W={world} {args.part}: batch/rank={args.batch} mini={args.mini}: "
                  f"{statistics.median(clock.times[1:] or clock.times):.3f} s/step, peak RSS rise {rise:.1f} MiB")
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
