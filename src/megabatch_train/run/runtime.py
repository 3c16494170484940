"""The run's processes: joining torchrun's group, and the collectives' failure handling.

Runtime says where this process runs (rank, world, device) and how long a collective waits for a
peer; `collective` turns a peer's failure into a CollectiveError that names what was waiting.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config.sections import TrainConfig


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    owns_group: bool
    timeout: float = 1800.0  # --dist-timeout: seconds a collective waits for a peer
    threads: int = 0  # --threads (0: torch's default)


def restart_count() -> int:
    """torchrun's count of this worker group's restarts (0 on the first attempt, and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _elastic_store(timeout: timedelta) -> Optional[dist.Store]:
    """The store for init_process_group under torchrun, its keys namespaced by the restart.

    Why: torchrun's c10d rendezvous shares one TCPStore server, hosted by the agent, with its
    workers (TORCHELASTIC_USE_AGENT_STORE=True), and the same server serves every restart.
    init_process_group keys the ranks' gloo addresses (and NCCL's unique id) by group name only,
    so a restarted rank can read the address a killed peer published in the previous attempt
    before the restarted peer overwrites it, and gloo's connectFullMesh fails ("Connection
    refused", or "Connect timeout"). Measured with benchmarks/gloo_restart_repro.py (a bare
    2-rank gloo script, rank 1 SIGKILLed): 8 of 10 restarts failed so; 10 of 10 succeed with this
    namespace, 8 of 8 with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each attempt).
    The restart count is the same for every worker of one agent, so this holds on one node; with
    several nodes each agent counts its own restarts, and restarts need
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (README, Limits).
    Returns None (let init_process_group use env://) when the agent's store is not shared.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        if os.environ.get("RANK") == "0":  # several agents: their restart counts disagree (see above)
            warnings.warn("torchrun shares one TCPStore with the workers of every attempt: with several nodes, "
                          "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment or restarts may fail "
                          "in gloo's connectFullMesh / NCCL's init", stacklevel=2)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megabatch/attempt_{restart_count()}", store)


def init_runtime(device: str, timeout_s: float = 1800.0) -> Runtime:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on CUDA); collectives
    that wait longer than `timeout_s` seconds for a peer fail instead of hanging."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s)
        store = _elastic_store(timeout)
        kwargs: dict[str, Any] = {} if store is None else dict(
            store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **kwargs)
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return Runtime(rank, world, dev, owns, timeout_s)


def start(cfg: TrainConfig) -> Runtime:
    """Validate `cfg` and join the run's processes (init_runtime with its --device and --dist-timeout)."""
    cfg.validate()
    rt = init_runtime(cfg.device, cfg.dist_timeout)
    rt.threads = cfg.threads
    return rt


class CollectiveError(RuntimeError):
    """A collective failed: a peer stopped calling it (timeout) or died (connection closed)."""


# What gloo and NCCL say when a peer stopped (timeout) or died (closed connection); gloo raises
# plain RuntimeErrors, so the text is all there is to go by.
_PEER_FAILURE = re.compile(r"timed out|timeout|connection|closed|reset by peer|read error|gloo|nccl", re.IGNORECASE)


@contextlib.contextmanager
def collective(what: str, rt: Runtime) -> Any:
    """Name the collective in the error when `what` fails for want of a peer."""
    if rt.world == 1:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or _PEER_FAILURE.search(str(e))):
            raise  # not a communication failure: keep the error as it is
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(f"{what} failed (waited up to --dist-timeout {rt.timeout:g} s for the other "
                              f"ranks; a rank stopped calling it or died): {first}") from e


def barrier(what: str, rt: Runtime) -> None:
    if rt.world > 1:
        with collective(what, rt):
            dist.barrier()


def sum_over_ranks(value: Tensor | float, world: int) -> float:
    """A scalar summed over ranks (one tiny all-reduce; on logging steps only)."""
    if world == 1:
        return float(value)
    t = torch.as_tensor(value).detach().reshape(1).double().clone()
    dist.all_reduce(t)
    return float(t)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
