"""Preemption: SIGTERM or SIGUSR1 stops the run at one step every rank agrees on, after one checkpoint.

Who sends what: a spot/preemptible VM, Kubernetes and `kill` send SIGTERM; torchrun's agent forwards
SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers (and SIGUSR1 too with `--signals-to-handle
SIGTERM,SIGUSR1`), then SIGKILLs them after `--shutdown-timeout` (30 s by default); SLURM sends
SIGUSR1 ahead of the time limit when asked (`sbatch --signal=USR1@60`).

Why the handler only records the signal: a rank that saved or raised from inside a handler would
leave a collective half done and its peers waiting until --dist-timeout. Instead every step's
non-finite check (one all_reduce that already exists, step.nonfinite_ranks) carries one flag per
signal, so every rank learns at the same step that some rank was asked to stop -- also when the
signal reached one rank only -- and they stop together after that step: the normal checkpoint
save at that step, a barrier, and `Preempted`, whose exit code for the command is 128 + the
signal's number (143 for SIGTERM, 138 for SIGUSR1; the shell's convention for "ended by signal").
Running the same command again resumes from that checkpoint.

SIGINT (Ctrl-C) is left alone: it still interrupts at once, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Callable, NoReturn, Optional, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The command's exit code after a stop for `signum` (128 + its number: 143 for SIGTERM)."""
    return 128 + int(signum)


class Preempted(Exception):
    """The run stopped for a signal after writing a checkpoint; running it again resumes there."""

    def __init__(self, signum: int, step: int, path: Optional[Path], seconds: float, saved_step: Optional[int] = None):
        self.signum, self.step, self.path, self.seconds = signal.Signals(signum), step, path, seconds
        if path is None:  # the save failed (said above) and none was written before
            said = "its checkpoint could not be written (see above) and there is no earlier one: a rerun starts over"
        elif saved_step is None or saved_step == step:
            said = f"checkpoint {path} written ({seconds:.1f} s); run the same command to resume"
        else:
            said = (f"its checkpoint could not be written (see above); the newest is {path} (step {saved_step}): "
                    "run the same command to resume from there")
        super().__init__(f"preempted by {self.signum.name} at step {step}: {said}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopRequest:
    """While entered, SIGTERM and SIGUSR1 only record that this process was asked to stop.

    `pending()` is this rank's contribution to the step's all_reduce (one 0/1 per signal of
    SIGNALS); `agreed(sums)` reads the reduced values back: the signal every rank stops for, or
    None. Outside the main thread (where Python cannot install handlers) nothing is installed and
    the signals keep their previous meaning.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def pending(self) -> list[float]:
        return [1.0 if self.received == sig else 0.0 for sig in SIGNALS]

    @staticmethod
    def agreed(sums: Sequence[float]) -> Optional[signal.Signals]:
        """The signal the ranks stop for, from the all_reduced `pending()` values (the first of
        SIGNALS that any rank received), or None to go on."""
        return next((sig for sig, n in zip(SIGNALS, sums) if n > 0), None)


def shield_loader_worker(worker_id: int) -> None:
    """The `worker_init_fn` of the file streams' DataLoader workers: the trainer decides when to stop.

    Why: a signal sent to a process group (a terminal, `kill -TERM -PGID`, torchrun's agent, which
    signals each worker's group) or to every process of a job (SLURM) also reaches the loader
    workers, and SIGTERM (torch's worker handler) or SIGUSR1 (the default action) ends them: the
    trainer then fails with "DataLoader worker ... is killed by signal: Terminated" before its
    checkpoint (seen with `--data csv:... --workers 2` and `kill -TERM -PGID`). So a worker ignores
    SIGUSR1, and a thread takes SIGTERM (blocked everywhere else) and ends the worker only when its
    parent sent it -- the loader's own `terminate()` at exit; from anyone else it is ignored. A
    worker whose parent died notices it by itself (torch's watchdog)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: SIGTERM keeps torch's meaning
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread and those it starts

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="megabatch-sigterm", daemon=True).start()


def stop(signum: int, step: int, save: Callable[[], tuple[Optional[Path], Optional[int]]],
         barrier: Callable[[], None], lead: bool) -> NoReturn:
    """Write the checkpoint of `step` (every rank takes part in `save`, which returns the newest
    checkpoint written and its step: `step`'s own, or an older one when this save failed), wait for
    every rank (`barrier`: rank 0 is still writing when the others return from `save`; a rank that
    ended first would make torchrun stop the others before the file is complete), say so on rank 0,
    and raise Preempted on every rank."""
    t0 = time.perf_counter()
    path, saved_step = save()
    barrier()
    error = Preempted(signum, step, path, time.perf_counter() - t0, saved_step)
    if lead:
        print(f"megabatch train: {error}", flush=True)
    sys.stderr.flush()
    raise error
