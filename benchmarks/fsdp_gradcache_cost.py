"""What GradCache costs under FSDP2 against DDP: time per step and collectives per step (2 gloo ranks).

    python benchmarks/fsdp_gradcache_cost.py [--steps 4] [--local 128] [--micro 16]

The app's ContrastiveModel (ViT + text transformer, width 256, depth 4 each: one FSDP unit per
block, then the root), CLIP loss (ring), GradCache with `local / micro` micro-batches per rank,
in three wirings:
  ddp         DistributedDataParallel; GradCache all-reduces once per step (no_sync before);
  fsdp        fully_shard; GradCache reduce-scatters once per step (set_requires_gradient_sync
              False before the last micro-batch): unsharded gradients accumulate in between;
  fsdp_every  the same, but every micro-batch's backward reduce-scatters (sync left on): gradients
              stay sharded, at one reduce-scatter per unit per micro-batch.
Prints per wiring: median seconds per step (after one warm-up step), all_gathers and
reduce_scatters per step and rank (counted by wrapping the torch.distributed functions FSDP2's
default collectives call), and the gradient memory a rank holds between micro-batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, mode: str, args: argparse.Namespace, init: str, out: str) -> None:
    import megabatch as mb
    from megabatch_train.config.sections import ModelConfig
    from megabatch_train.models.towers import ContrastiveModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    cfg = ModelConfig(image_size=32, patch_size=8, vision_width=256, vision_depth=4, vision_heads=4,
                      text_width=256, text_depth=4, text_heads=4, context_length=16, embed_dim=128)
    torch.manual_seed(0)
    model = ContrastiveModel(cfg, vocab_size=256)
    n_params = sum(p.numel() for p in model.parameters())
    counts = {"all_gather": 0, "reduce_scatter": 0}
    if mode == "ddp":
        wrapper = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from megabatch_train.run import fsdp

        wrapper = fsdp.shard(model, torch.device("cpu"), world)
        if mode == "fsdp_every":
            type(model).set_requires_gradient_sync = lambda self, *a, **k: None  # sync stays on
    for fn, key in (("all_gather_single", "all_gather"), ("reduce_scatter_single", "reduce_scatter")):
        original = getattr(dist, fn)

        def counted(*a, _original=original, _key=key, **k):
            counts[_key] += 1
            return _original(*a, **k)

        setattr(dist, fn, counted)
    gc = mb.GradCache(model.encode_image, model.encode_text, lambda x, y, s: mb.clip_loss(x, y, s, strategy="ring"),
                      args.micro, modules=wrapper)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    times, per_step = [], []
    for step in range(args.steps + 1):
        images = torch.randn(args.local, 3, 32, 32, generator=g)
        tokens = torch.randint(1, 256, (args.local, 16), generator=g)
        before = dict(counts)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if mode != "ddp":
            model.unshard()
        gc(images, tokens, model.logit_scale.exp())
        if mode != "ddp":
            model.reshard()
        opt.step()
        dist.barrier()
        if step:
            times.append(time.perf_counter() - t0)
            per_step.append({k: counts[k] - before[k] for k in counts})
    held = {"ddp": n_params, "fsdp": n_params, "fsdp_every": n_params / world}[mode] * 4 / 2**20
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"mode": mode, "s_per_step": statistics.median(times), "collectives_per_step": per_step[-1],
                       "params": n_params, "grad_mib_held_between_micro_batches": held}, f)
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--local", type=int, default=128, help="pairs per rank")
    p.add_argument("--micro", type=int, default=16)
    args = p.parse_args()
    print(f"torch {torch.__version__}, 2 gloo ranks, {os.cpu_count()} CPUs, local batch {args.local}, "
          f"micro-batch {args.micro}", flush=True)
    for mode in ("ddp", "fsdp", "fsdp_every"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(worker, args=(2, mode, args, os.path.join(tmp, "rdv"), out), nprocs=2)
            print(json.dumps(json.load(open(out))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
