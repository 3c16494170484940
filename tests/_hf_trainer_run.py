"""Worker for test_hf_trainer.py, launched by torchrun: one training step of ContrastiveTrainer.

argv: OUT KIND:MICRO [KIND:MICRO ...] (MICRO 0 = no GradCache), one Trainer each, in turn. Every rank gets 4 of the 12 examples (one step
takes the whole data set, so the global batch is all of it in some order); a callback saves the
gradients as the optimiser is about to see them (after DDP's averaging); the logged loss is the
ranks' mean (Trainer gathers it to log; rounded to 4 digits).
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _hf_models as H  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from megabatch.integrations import hf  # noqa: E402

N, PER_RANK = 12, 4


class Grab(TrainerCallback):
    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = H.grads_of(self.model)


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        kind, micro = spec.split(":")
        train(out, kind, int(micro))
    if dist.is_initialized():  # gloo: end cleanly (a rank may otherwise hang or abort at exit)
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


def train(out: str, kind: str, micro: int) -> None:
    inputs = H.batch(kind, N, seed=5)
    rows = [{k: v[i] for k, v in inputs.items()} | {"image_ids": torch.tensor(i), "text_ids": torch.tensor(i)}
            for i in range(N)]
    model = H.build(kind)
    args = TrainingArguments(
        output_dir=os.path.join(out, f"trainer-{kind}-{micro}"), per_device_train_batch_size=PER_RANK, max_steps=1,
        learning_rate=1e-3, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none",
        save_strategy="no", logging_steps=1, per_device_eval_batch_size=PER_RANK, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    grab = Grab(model)
    trainer = hf.ContrastiveTrainer(model=model, args=args, train_dataset=rows, callbacks=[grab],
                                    micro_batch_size=micro or None)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    evaluated = trainer.evaluate(eval_dataset=rows)["eval_loss"]  # 4 per rank: one global batch of 12
    with torch.no_grad():
        after = model(**inputs, return_loss=True).loss.item()  # HF's loss of the trained model, all 12
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"grads": grab.grads, "loss": logged, "eval_loss": evaluated, "hf_eval_loss": after,
                    "world": int(os.environ.get("WORLD_SIZE", "1"))}, os.path.join(out, f"{kind}-{micro}.pt"))


if __name__ == "__main__":
    main()
