"""sentence-transformers' CachedMNRL (gather_across_devices) against MegabatchLoss, side by side.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/st_side_by_side.py \
        [--part megabatch|cached_mnrl|alone|predict] [--batch 256] [--mini 32] [--steps 4] [--alone 4096]

--part megabatch / cached_mnrl trains the same tiny random BertModel (tests/_st_models.py, width
16) with that loss on the same random (anchor, positive) texts, per-rank batch --batch, GradCache
mini-batch --mini, one-way, on gloo CPU ranks under SentenceTransformerTrainer, and prints (rank 0)
the median seconds per step after the first and the rise of this process's peak resident memory
(ru_maxrss) over its level before training: a coarse, CPU-only measure, so run each part in its own
process.

--part alone measures the loss's arithmetic alone: forward and backward on random (--alone, 384)
float32 embeddings a rank, no model, for each of --losses in turn on the same ranks: megabatch
(`mb.clip_loss`, one-way, tiled ring), sentence-transformers' MNRL with gather (its b x B logits)
and CachedMNRL's loss stage with gather (`calculate_loss(with_backward=True)`: the gathered
embeddings and --mini rows of scores at a time, a backward through the gather for each). Each
loss's peak is its own: the process's peak resident size is set back to its current size before
it (Linux /proc/self/clear_refs), so the order does not matter. MNRL is skipped, with the reason,
where W times the peak `megabatch plan` predicts for it does not fit this host's available memory
(all ranks share one host). --json writes the rows with the machine, versions, date and command.
--part predict (no torchrun) writes `megabatch plan`'s peaks for --predict-batch x --predict-world.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(args, rank: int, world: int) -> None:
    """--part megabatch / cached_mnrl (sentence-transformers is imported here: --part predict needs only torch)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import _st_models
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses as st_losses
    from transformers import TrainerCallback

    from megabatch.integrations.sentence_transformers import MegabatchLoss

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        model = _st_models.build(os.path.join(tmp, f"m{rank}"))
        n = args.batch * world * args.steps
        data = Dataset.from_dict({"anchor": _st_models.sentences(n, 1), "positive": _st_models.sentences(n, 2)})
        clock = Clock()
        targs = SentenceTransformerTrainingArguments(
            output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=1e-4, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, seed=0, logging_steps=args.steps)
        if args.part == "cached_mnrl":
            loss = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini,
                                                                gather_across_devices=True)
        else:
            loss = MegabatchLoss(model, mini_batch_size=args.mini)
        before = rss_mib()
        SentenceTransformerTrainer(model=model, args=targs, train_dataset=data, loss=loss, callbacks=[clock]).train()
        rise = rss_mib() - before
    if rank == 0:
        print(f"W={world} {args.part}: batch/rank={args.batch} mini={args.mini}: "
              f"{statistics.median(clock.times[1:] or clock.times):.3f} s/step, peak RSS rise {rise:.1f} MiB")


ALONE_LOSSES = ("megabatch", "mnrl", "cached_mnrl")


def _status(key: str) -> int:
    """A line of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> bool:
    """Set this process's peak resident size back to its current size (Linux clear_refs 5); False if refused,
    and then a loss's rise is measured above the earlier losses' peak (a lower bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def mnrl_need(world: int, global_batch: int, dim: int) -> tuple[int, str]:
    """Bytes the W ranks of this host need for MNRL with gather, and how that is computed: W times the peak
    `megabatch plan` predicts for the dense gather baseline, which holds the same b x B logits (their
    log-softmax and the two gradients: 4 float32 b x B matrices a rank)."""
    from megabatch.plan import plan

    peak = plan("clip", "gather", "dense", world, global_batch, dim, "float32", device="cpu").peak_bytes
    b = global_batch // world
    how = (f"{world} ranks x {peak / 2**30:.2f} GiB (megabatch plan --world {world} --batch {global_batch} "
           f"--dim {dim} --device cpu --dtype float32, gather dense: 4 float32 {b} x {global_batch} matrices)")
    return world * peak, how


def one_loss(name: str, b: int, dim: int, mini: int, repeat: int) -> dict:
    """Forward and backward of one loss on random (b, dim) embeddings a rank: seconds per step (between two
    barriers), this rank's peak resident rise over its level before the step, the global loss."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    g = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(b, dim, generator=g).requires_grad_()
    d = torch.randn(b, dim, generator=g).requires_grad_()
    reset = _reset_peak()
    before = _status("VmRSS") if reset else _status("VmHWM")
    times, value = [], 0.0
    for _ in range(repeat):
        q.grad = d.grad = None
        dist.barrier()
        start = time.perf_counter()
        if name == "cached_mnrl":  # CachedMNRL's loss stage: mini-batch chunks of the scores, each backwarded
            st = st_losses.CachedMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()),
                                                              mini_batch_size=mini, gather_across_devices=True)
            loss = st.calculate_loss([[q], [d]], with_backward=True)
        elif name == "mnrl":
            st = st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), gather_across_devices=True)
            loss = st.compute_loss_from_embeddings([q, d], None)
            loss.backward()
        else:
            import megabatch as mb

            qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
            loss = mb.clip_loss(qn, dn, 20.0, directions="image_to_text")
            loss.backward()
        dist.barrier()
        times.append(time.perf_counter() - start)
        value = loss.detach().clone()
        del loss
    dist.all_reduce(value)
    rise = (_status("VmHWM") - before) / 2**20
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, round(rise, 1))
    return {"seconds_per_step": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
            "peak_rise_mib_per_rank": ranks, "peak_rise_mib_max": max(ranks),
            "peak_measure": "VmHWM reset by clear_refs" if reset else "ru_maxrss rise (a lower bound)",
            "global_loss": round(float(value) / dist.get_world_size(), 6),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def environment() -> dict:
    import platform

    import sentence_transformers

    import megabatch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                        / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__, "megabatch": megabatch.__version__,
            "commit": commit, "threads_per_rank": torch.get_num_threads(),
            "command": "torchrun --nproc_per_node {} benchmarks/st_side_by_side.py {}".format(
                dist.get_world_size(), " ".join(sys.argv[1:]))}


def alone(args, rank: int, world: int) -> None:
    """Each loss of --losses in turn on the same ranks; MNRL only where W x its predicted peak fits this host."""
    out = {"environment": environment(), "world": world, "rows_per_rank": args.alone,
           "global_batch": args.alone * world, "dim": 384, "dtype": "float32", "mini_batch_cached_mnrl": args.mini,
           "load_average_before": [round(x, 2) for x in os.getloadavg()], "losses": {}}
    for name in args.losses:
        if name == "mnrl":
            need, how = mnrl_need(world, args.alone * world, 384)
            avail = [_mem_available()]
            dist.broadcast_object_list(avail, src=0)
            if need > avail[0] - args.keep_free * 1e9:
                out["losses"][name] = {"not_run": f"needs {need / 1e9:.1f} GB = {how}; this host had "
                                                  f"{avail[0] / 1e9:.1f} GB available, less {args.keep_free:g} GB "
                                                  "kept free (--keep-free)"}
                continue
        out["losses"][name] = one_loss(name, args.alone, 384, args.mini, args.repeat)
        gc.collect()
    if rank == 0:
        for name, row in out["losses"].items():
            text = row.get("not_run") or (f"{row['median_s']:.2f} s/step, peak RSS rise a rank "
                                          f"{row['peak_rise_mib_max']:.1f} MiB (max over ranks), "
                                          f"loss {row['global_loss']:.5f}")
            print(f"W={world} loss alone, {args.alone} rows a rank, global {args.alone * world}, D=384: {name}: "
                  f"{text}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
                f.write("\n")


def predict(args) -> None:
    """`megabatch plan`'s per-rank peaks for the global batches and ranks given (no processes started)."""
    from megabatch.plan import plan

    rows = []
    for batch in args.predict_batch:
        for world in args.predict_world:
            ring = plan("clip", "ring", "torch", world, batch, 384, "float32", device="cpu")
            dense = plan("clip", "gather", "dense", world, batch, 384, "float32", device="cpu")
            rows.append({"global_batch": batch, "world": world, "status": "predicted",
                         "megabatch_ring_tiled_peak_bytes": ring.peak_bytes,
                         "mnrl_gather_dense_peak_bytes": dense.peak_bytes,
                         "command": f"megabatch plan --world {world} --batch {batch} --dim 384 --device cpu "
                                    "--dtype float32"})
            print(f"B={batch} W={world} (predicted): megabatch ring {ring.peak_bytes / 2**20:.0f} MiB, "
                  f"dense gather (MNRL's b x B) {dense.peak_bytes / 2**30:.1f} GiB a rank")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "note": "predicted by megabatch.plan, not run",
                       "command": "python benchmarks/st_side_by_side.py " + " ".join(sys.argv[1:]),
                       "rows": rows}, f, indent=1)
            f.write("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("megabatch", "cached_mnrl", "alone", "predict"), default="megabatch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mini", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--alone", type=int, default=4096, help="per-rank batch of the loss-alone measurement")
    p.add_argument("--losses", nargs="+", choices=ALONE_LOSSES, default=list(ALONE_LOSSES),
                   help="--part alone: the losses to run (e.g. only megabatch)")
    p.add_argument("--repeat", type=int, default=1, help="--part alone: steps of each loss")
    p.add_argument("--keep-free", type=float, default=2.0,
                   help="--part alone: GB of available memory MNRL must leave free, else it is not run")
    p.add_argument("--json", help="--part alone / predict: write the results to this file (rank 0)")
    p.add_argument("--predict-batch", type=int, nargs="+", default=[262144, 524288, 1048576])
    p.add_argument("--predict-world", type=int, nargs="+", default=[4, 8])
    args = p.parse_args()
    for flag in ("batch", "mini", "steps", "alone", "repeat"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("predict_batch", "predict_world"):
        if min(getattr(args, flag)) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive integers, got {getattr(args, flag)}")
    if args.keep_free < 0:
        p.error(f"--keep-free must be a number of GB >= 0, got {args.keep_free}")
    if args.part == "predict":
        predict(args)
        return
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.part == "alone":
        dist.init_process_group("gloo")
        alone(args, rank, world)
    else:
        train(args, rank, world)
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
