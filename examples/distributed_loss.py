"""A few DDP training steps of a tiny two-tower model with a batch-global CLIP or SigLIP loss.

    torchrun --nproc_per_node 4 examples/distributed_loss.py [--loss clip|siglip] [--strategy ring|gather]
    # several nodes: the same command on each, plus
    #   --nnodes 2 --node_rank {0,1} --master_addr HOST --master_port 29500

The same file runs on CPUs (gloo) and on GPUs (NCCL, one per process): the backend follows from
torch.cuda.is_available(). Each rank encodes its own local batch (sizes may differ: --uneven); the
loss spans the global batch, so every image meets every text of every rank, and DDP's gradient
averaging yields exactly the gradient of the global loss. The last step checks the loss against the
float64 single-process reference on the gathered batch.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import megabatch as mb


class TwoTowers(nn.Module):
    """Image and text towers (one linear layer each) plus the learnable logit scale (and bias)."""

    def __init__(self, image_dim: int, text_dim: int, dim: int, siglip: bool):
        super().__init__()
        self.image, self.text = nn.Linear(image_dim, dim), nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(10.0 if siglip else 1 / 0.07).log())
        self.bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, y = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return (x, y, self.log_scale.exp()) + (() if self.bias is None else (self.bias,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    p.add_argument("--strategy", choices=("auto", "ring", "gather"), default="auto")
    p.add_argument("--batch", type=int, default=256, help="local batch per rank")
    p.add_argument("--uneven", action="store_true", help="rank r holds batch + 3r pairs")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    b = args.batch + (3 * rank if args.uneven else 0)
    total = sum(args.batch + (3 * r if args.uneven else 0) for r in range(world))

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = TwoTowers(48, 32, args.dim, args.loss == "siglip").to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = mb.clip_loss if args.loss == "clip" else mb.siglip_loss
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data

    for step in range(args.steps):
        images = torch.randn(b, 48, generator=gen).to(device)
        texts = images[:, :32] + 2.0 * torch.randn(b, 32, generator=gen).to(device)
        out = ddp(images, texts)
        loss = loss_fn(*out, strategy=args.strategy)  # this rank's share: mean over ranks = global loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: global {args.loss} loss {mean.item() / world:.6f}  (world {world}, global batch {total})")

    with torch.no_grad():  # the check: the same loss on one process, in float64, on the gathered batch
        out = ddp(images, texts)
        loss = loss_fn(*out, strategy=args.strategy)
        dist.all_reduce(loss)
        parts = [None] * world
        dist.all_gather_object(parts, [t.cpu() for t in out])
    if rank == 0:
        x, y = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        extras = parts[0][2:]
        ref_fn = mb.clip_loss_reference if args.loss == "clip" else mb.siglip_loss_reference
        ref = ref_fn(x, y, *extras).item()
        print(f"final loss {loss.item() / world:.6f}, float64 reference on the gathered batch {ref:.6f}, "
              f"relative difference {abs(loss.item() / world - ref) / abs(ref):.1e}")
    dist.barrier()
    time.sleep(0.05)  # gloo: let the barrier drain before teardown (a rank may otherwise hang or abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
