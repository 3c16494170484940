"""Commands a test starts and must end, with every process they start, within deadlines.

Why not Popen.communicate and killpg: torchrun starts each worker in a session of its own (setsid),
so killing torchrun's process group misses the workers, and a worker that outlives torchrun keeps
the output pipe open, so communicate() blocks until it exits (seen: a rank stuck in teardown held a
test until pytest's 600 s timeout). Here the command's environment carries a unique
MEGABATCH_TEST_TAG, which every process it starts inherits, so `processes()` finds them all by it
(psutil, this user's processes), orphans included; output is read by a thread, so every wait has a
deadline; leaving the `with` block kills whatever is left.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from typing import Optional

import psutil

TAG = "MEGABATCH_TEST_TAG"


class Tracked:
    def __init__(self, cmd: list[str], env: Optional[dict[str, str]] = None):
        self.tag = uuid.uuid4().hex
        self.proc = subprocess.Popen(cmd, env={**(os.environ if env is None else env), TAG: self.tag},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.started = time.monotonic()
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for_line(self, pattern: str, timeout: float) -> Optional[re.Match]:
        """The first output line matching `pattern` (re.search), or None at the deadline or the
        end of the output."""
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout, 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return None
                self._cond.wait(left)

    def wait(self, timeout: float) -> Optional[int]:
        """The command's exit code, or None if it still runs after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def processes(self) -> list[psutil.Process]:
        """Every live process of the command (itself and all it started, in any session)."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG) == self.tag:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def process_of_rank(self, rank: int, timeout: float) -> Optional[psutil.Process]:
        """The torchrun worker of global rank `rank` (its environment's RANK), once it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes():
                try:
                    if p.pid != self.proc.pid and p.environ().get("RANK") == str(rank):
                        return p
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            time.sleep(0.1)
        return None

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Wait until no process of the command is left; those still alive after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def end(self) -> None:
        """Kill every process of the command that is left, and stop reading its output."""
        for _ in range(3):  # a process may start another while we kill (torchrun restarting a worker)
            left = self.processes()
            if not left:
                break
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=10)
        if self.proc.poll() is None:  # not reaped yet, so its process group id cannot have been reused
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)
        self._reader.join(10)  # every writer is gone: the pipe is at its end

    def __enter__(self) -> "Tracked":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
