"""Ending a rank after a communication failure without waiting for its peers.

Why not the usual teardown: after a collective failed, `destroy_process_group()` and Python's own
clean-up at exit can block for good. Measured (torch 2.13, gloo, `torchrun --nproc_per_node 2 -m
megabatch_train --preset tiny --steps 6 --dist-timeout 3` with MEGABATCH_FAULT=hang@3:1, two busy
cores): rank 0 printed its CollectiveError and then never exited; gdb showed its main thread, holding
the GIL, freeing DDP's Reducer -> ~ProcessGroupGloo -> joining a gloo worker thread, which was
waiting for the GIL to drop a tensor of the failed work: a deadlock, whatever the peer does. So a
rank whose group failed aborts the group where the backend can (NCCL frees its communicators;
gloo's abort is quick), never destroys it, and the command ends with os._exit after flushing its
output, skipping every destructor. A kernel alarm bounds the abort itself.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

import torch.distributed as dist

ABORT_LIMIT_S = 10  # the abort's own bound (SIGALRM's default action ends the process)


def abandon_group() -> None:
    """Abort the default process group (every group) instead of destroying it; never raises.

    An abort that blocks is cut short by SIGALRM's default action (the process ends) after
    ABORT_LIMIT_S seconds; Python's signal machinery is not needed for that, so a thread holding
    the GIL cannot delay it."""
    if not dist.is_initialized():
        return
    armed = threading.current_thread() is threading.main_thread()
    if armed:
        previous = signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(ABORT_LIMIT_S)
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - a backend without abort: the process ends soon anyway
        pass
    finally:
        if armed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def exit_now(code: int) -> NoReturn:
    """End the process with `code` at once: flush stdout and stderr, then os._exit (no atexit
    handlers, no destructors -- those are what block after a failed collective)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
            pass
    os._exit(code)
