"""The cause of "connectFullMesh ... Connection refused" after a torchrun restart, without the app.

    python benchmarks/gloo_restart_repro.py [--tries 6]

A bare 2-rank gloo script runs under `torchrun --standalone --max-restarts 1`; in the first attempt
rank 1 SIGKILLs itself after one all_reduce, so torchrun restarts both workers. Three ways to
build the process group in the restarted attempt, `--tries` times each:
  plain     init_process_group("gloo") (env://: the agent's shared TCPStore, keys by group name);
  prefixed  the same store wrapped in PrefixStore("megabatch/attempt_<TORCHELASTIC_RESTART_COUNT>")
            (what megabatch_train does);
  noshare   plain, with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store every attempt).
Measured 2026-12-01 (2 shared cores, torch 2.13.0+cpu), two runs: plain 1 of 6 and 1 of 4 restarts
succeeded, every failure in gloo's connectFullMesh ("Connection refused", or "Connect timeout"
when the stale address answers nothing: a restarted rank read its killed peer's old address);
prefixed 6 of 6 and 4 of 4; noshare 4 of 4 and 4 of 4.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta


def worker(mode: str) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    timeout = timedelta(seconds=20)
    if mode == "prefixed":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"megabatch/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    x = torch.ones(1)
    dist.all_reduce(x)
    print(f"attempt {attempt} rank {rank}: init ok", flush=True)
    if attempt == 0 and rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=6)
    p.add_argument("--worker", choices=("plain", "prefixed"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    for mode in ("plain", "prefixed", "noshare"):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if mode == "noshare":
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        ok = mesh = 0
        for _ in range(args.tries):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--max-restarts", "1", __file__, "--worker", "prefixed" if mode == "prefixed" else "plain"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            ok += proc.returncode == 0
            mesh += "connectFullMesh failed" in proc.stdout + proc.stderr
        print(f"{mode:9} {ok}/{args.tries} restarts succeeded, {mesh} failed in gloo's connectFullMesh", flush=True)


if __name__ == "__main__":
    main()
