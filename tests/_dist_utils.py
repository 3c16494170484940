"""Process harness for the distributed tests: real processes, gloo on CPU, one thread per worker.

`run_world(fn, world, tmp_path, *args)` starts `world` fresh processes, each joining a fresh
file:// rendezvous under tmp_path, runs `fn(rank, world, *args)` and writes its (picklable) result
to a file; the parent loads the results in rank order. A worker that raises has its traceback
reported; a world that does not finish within `timeout` seconds is killed and reported as a hang.
Workers end with barrier, a short sleep and destroy_process_group, then os._exit, since gloo
otherwise sometimes aborts at interpreter exit.

The processes come from a forkserver that imported torch, dynamo and megabatch once per session
(PRELOAD): a spawned process imports them again, ~4 s of CPU per rank (measured: the 17 ranks of
test_hierarchical.py and test_hf.py take 166 s of CPU spawned, 103 s forked). The forkserver runs no
torch op (no thread pool to inherit). Each worker gets the parent's environment as it is at
run_world (a forked worker would otherwise have the forkserver's, from its start), and its cwd and
sys.path as with spawn.
"""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# Imported once, by the forkserver, before it forks any worker.
PRELOAD = ["torch", "torch.distributed", "torch.multiprocessing", "torch._dynamo", "megabatch", "_dist_utils"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first run_world of the session
    return ctx


def _entry(fn: Callable[..., Any], rank: int, world: int, init: str, out: str, args: tuple,
           env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        payload: tuple[str, Any] = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        payload = ("error", traceback.format_exc())
    tmp = Path(out) / f"{rank}.tmp"
    torch.save(payload, tmp)
    tmp.rename(Path(out) / f"{rank}.pt")
    if payload[0] != "ok":
        os._exit(1)  # peers may be stuck in a collective: no barrier
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()
    os._exit(0)


def run_world(fn: Callable[..., Any], world: int, tmp_path: Path, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run fn(rank, world, *args) on `world` gloo ranks; return the results, rank by rank."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    init, out = tmp_path / "rendezvous", tmp_path / "results"
    out.mkdir()
    ctx, env = _context(), dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(init), str(out), args, env)) for r in range(world)]
    for p in procs:
        p.start()
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() > failed_at + 5.0:
            break  # a rank failed; the others are waiting for it in vain
        time.sleep(0.02)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errors = []
    results = []
    for r in range(world):
        f = out / f"{r}.pt"
        if not f.exists():
            errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
            continue
        status, value = torch.load(f, weights_only=False)
        if status != "ok":
            errors.append(f"rank {r} raised:\n{value}")
        results.append(value)
    if errors or hung:
        raise AssertionError(f"world of {world} failed (ranks still running when killed: {hung}):\n" + "\n".join(errors))
    return results
