"""A Hugging Face CLIPModel / SiglipModel trained under torchrun with megabatch's exact global loss.

    torchrun --nproc_per_node 2 examples/hf_torchrun.py [--model siglip] [--steps 3]

Every rank encodes its own share of the batch; megabatch's loss makes every image meet every text of
every rank (HF's own loss would see only the local b x b logits), and DDP's averaging yields exactly
the global batch's gradient. A tiny random model and random inputs stand in for yours (offline).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import transformers as tf
from torch.nn.parallel import DistributedDataParallel as DDP

from megabatch.integrations import hf

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_model(kind: str) -> torch.nn.Module:
    text = dict(TOWER, vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=0)
    vision = dict(TOWER, image_size=32, patch_size=8)
    if kind == "siglip":
        return tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("clip", "siglip"), default="clip")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="pairs per rank")
    args = p.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway

    model = DDP(tiny_model(args.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = hf.ContrastiveLoss()  # CLIP or SigLIP from the model; ring over every rank
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # this rank's share of the batch
        batch = {"pixel_values": torch.randn(args.batch, 3, 32, 32, generator=g),
                 "input_ids": torch.randint(1, 99, (args.batch, 16), generator=g)}
        batch["input_ids"][:, -1] = 99  # the end token CLIP pools at
        loss = loss_fn(model, batch)  # the rank's share of the global loss (their mean is the loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if dist.get_rank() == 0:
            print(f"step {step}: global loss {total.item() / dist.get_world_size():.4f}", flush=True)
    dist.barrier()
    time.sleep(0.05)  # gloo: let the barrier drain before teardown (a rank may otherwise hang or abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
