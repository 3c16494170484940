"""Worker for test_st_trainer.py, launched by torchrun: one or two steps of SentenceTransformerTrainer.

argv: OUT RUN [RUN ...], each RUN one trainer on the same tiny float64 model, data and seed (so
every run sees the same batches): "mnrl", "ours", "cached", "ours_cached" (symmetric, GradCache
mini-batch 3), "siglip" (MegabatchLoss(loss="siglip", learnable=True), weight decay 0.1, two
steps). Every rank takes 4 of the 12 (anchor, positive, negative) rows a step. A callback keeps the
gradients as the optimiser is about to see them (after DDP's averaging), the model's and the loss's
own; rank 0 saves them with the logged loss; every rank saves the learnt scale and bias.
"uneven_ring" / "uneven_gather" / "uneven_hierarchical" (ranks_per_node=1, LOCAL_WORLD_SIZE removed
first) run no trainer: rank r calls the loss (UNEVEN, that strategy) on its own 3 + 2r rows of a batch
with repeated anchors and averages the gradients itself.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _st_models  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from megabatch.integrations.sentence_transformers import MegabatchLoss  # noqa: E402

N, PER_RANK, MINI = 12, 4, 3
SYM = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
UNEVEN = dict(positive_columns=2, positives="anchor", mini_batch_size=2, learnable=True, **SYM)


def uneven_rows(world: int) -> list[list[str]]:
    """(anchor, positive, positive, negative) columns of sum(3 + 2r) rows; anchors repeat (4 distinct)."""
    n = sum(3 + 2 * r for r in range(world))
    anchors = [_st_models.sentences(4, 9)[i % 4] for i in range(n)]
    return [anchors] + [_st_models.sentences(n, 10 + c) for c in range(3)]


def uneven(out: str, built, strategy: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = copy.deepcopy(built)
    start = sum(3 + 2 * r for r in range(rank))
    columns = [col[start:start + 3 + 2 * rank] for col in uneven_rows(world)]
    extra = {}
    if strategy == "hierarchical":  # 3 nodes of 1 rank, said by the keyword alone (torchrun's R would be 3)
        os.environ.pop("LOCAL_WORLD_SIZE", None)
        extra = dict(ranks_per_node=1)
    loss_fn = MegabatchLoss(model, strategy=strategy, **UNEVEN, **extra)
    loss = loss_fn([model.preprocess(c) for c in columns])
    for p in model.parameters():  # the loss's own scale averages its gradient itself
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    dist.all_reduce(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["norm.logit_scale"] = loss_fn.norm.logit_scale.grad
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, os.path.join(out, f"uneven_{strategy}-0.pt"))


def data() -> Dataset:
    return Dataset.from_dict({"anchor": _st_models.sentences(N, 1), "positive": _st_models.sentences(N, 2),
                              "negative": _st_models.sentences(N, 3)})


def make_loss(run: str, model):
    if run == "mnrl":
        return st_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)
    if run == "cached":
        return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI, gather_across_devices=True,
                                                            **SYM)
    if run == "ours":
        return MegabatchLoss(model)
    if run == "ours_cached":
        return MegabatchLoss(model, mini_batch_size=MINI, **SYM)
    if run == "siglip":
        # each rank starts its scalars from a different value: the loss must make them equal (rank 0's)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return MegabatchLoss(model, loss="siglip", scale=10.0 + rank, bias=-5.0 - rank, learnable=True)
    raise ValueError(run)


class Grab(TrainerCallback):
    def __init__(self, modules):
        self.modules, self.grads = modules, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({f"{i}.{n}": p.grad.clone() for i, m in enumerate(self.modules)
                           for n, p in m.named_parameters() if p.grad is not None})


def main() -> None:
    torch.set_num_threads(1)
    out, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
    # built before the first trainer initialises torch.distributed (save_pretrained then writes on rank 0 only)
    built = _st_models.build(os.path.join(out, f"model-{rank}")).double()
    for run in sys.argv[2:]:
        if run.startswith("uneven_"):
            uneven(out, built, run.split("_", 1)[1])
            continue
        model = copy.deepcopy(built)
        loss = make_loss(run, model)
        steps = 2 if run == "siglip" else 1
        args = SentenceTransformerTrainingArguments(
            output_dir=os.path.join(out, f"trainer-{run}"), per_device_train_batch_size=PER_RANK, max_steps=steps,
            learning_rate=1e-2, optim="sgd", weight_decay=0.1 if run == "siglip" else 0.0, max_grad_norm=0.0,
            lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        grab = Grab([model, loss])
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data(), loss=loss,
                                             callbacks=[grab])
        trainer.train()
        result = {"grads": grab.grads, "loss": trainer.state.log_history[0]["loss"],
                  "world": int(os.environ.get("WORLD_SIZE", "1"))}
        if run == "siglip":
            optimizer_groups = [(g["weight_decay"], {id(p) for p in g["params"]})
                                for g in trainer.optimizer.param_groups]
            result["scalars"] = [p.detach().clone() for p in loss.norm.parameters()]
            result["decay"] = [wd for p in loss.norm.parameters() for wd, ids in optimizer_groups if id(p) in ids]
        torch.save(result, os.path.join(out, f"{run}-{rank}.pt"))
    if dist.is_initialized():  # gloo: end cleanly
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
