"""Section 3 of benchmarks/gpu_check.py: megabatch and the peers side by side, one process per method.

Every method (megabatch's `triton` backend, each installed peer of megabatch.bench.peers) gets a
worker process of its own, started at once so that imports and CUDA start-up overlap; then the
parent sends the cases one by one, all methods at B = 32k, then all at 65k, ..., so that a budget
cut leaves a complete side-by-side at the smaller sizes. A worker runs a case with
megabatch.bench.measure (peak memory beyond the inputs on the first step, which also compiles;
then timed repeats; OOM recorded as such) and answers one line. The parent enforces a time limit
per case: past it the worker is killed, the case recorded as a timeout and that method's larger
cases skipped. A method is not run at a larger B once it ran out of memory, nor where its last
time scaled by B^2 projects past the limit (megabatch.bench.skip_reason).

    python benchmarks/gpu_check_peers.py --worker METHOD DEVICE   # a worker (the parent starts it)

The worker's protocol: it prints `@@ {"ready": true}` (or `{"ready": false, "why": ...}`) once
its method is importable, then reads one JSON Case per stdin line and prints `@@ <Result JSON>`.
Anything else it prints is passed to the log. The method "stall" (dry run only) sleeps instead of
measuring, so that the dry run exercises the kill path.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Optional

TAG = "@@ "
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


# ---- the worker ----------------------------------------------------------------------------------
def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(method: str, device: str) -> None:
    import torch

    from megabatch.bench import peers
    from megabatch.bench.single import Case, Result, measure

    try:
        if device.startswith("cuda"):
            torch.zeros(1, device=device)  # the CUDA context, now rather than in the first case
            torch.set_float32_matmul_precision("high")
        if method in peers.PEERS:
            for loss in peers.PEERS[method]:
                peers.get(method, loss)  # imports the peer (siglip_kernel autotunes its configs here)
        elif method == "triton":
            from megabatch.kernels import get_backend

            get_backend("triton", torch.device(device))
        elif method != "stall":
            raise ValueError(f"unknown method {method!r}")
    except Exception as e:
        _emit(dict(ready=False, why=f"{type(e).__name__}: {str(e)[:200]}"))
        return
    _emit(dict(ready=True))
    for line in sys.stdin:
        case = Case(**json.loads(line))
        if method == "stall":
            time.sleep(3600)
        try:
            res = measure(case)
        except Exception as e:  # measure catches OOM and the usual errors; anything else is the result too
            res = Result(case, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        _emit(asdict(res))


# ---- the parent ----------------------------------------------------------------------------------
class Worker:
    """One method's worker process: its stdout lines through a queue, its stderr in a temp file."""

    def __init__(self, method: str, device: str, pythonpath: list[str], log: Callable[[str], None]):
        self.method, self.log = method, log
        self.err = tempfile.TemporaryFile(mode="a+")  # O_APPEND: the worker writes, we read
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, SRC, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", method, device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=env)
        self.lines: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.lines.put(json.loads(line[len(TAG):]))
            elif line.strip():
                self.log(f"  [{self.method}] {line.rstrip()[:300]}")
        self.lines.put(None)  # EOF: the worker ended

    def ask(self, timeout: float) -> dict[str, Any]:
        """The worker's next message, or {"error": ...} on a timeout (the worker is killed) or its end."""
        timeout = max(timeout, 0.1)
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return dict(error=f"timeout: killed after {timeout:.1f} s")
        if msg is None:
            rc = self.proc.wait()
            return dict(error=f"worker ended (exit {rc}): {self.stderr_tail()}")
        return msg

    def send(self, case: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self, n: int = 600) -> str:
        self.err.seek(0)
        return self.err.read()[-n:].replace("\n", " | ")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        tail = self.stderr_tail(400)
        if tail.strip():  # warnings (autotuning, deprecations): the end of them, into the log
            self.log(f"  [{self.method} stderr] ...{tail}")
        self.err.close()


def case_limit(prev: Optional[dict[str, Any]], batch: int, repeat: int, first_s: float) -> float:
    """Seconds a case may take: a method's first case gets first_s (imports are done, but its kernels
    compile or autotune in it); later ones 3x their projection from the previous B plus 10 s."""
    if prev is None or prev.get("ms") is None:
        return first_s
    projected = prev["ms"] / 1e3 * (batch / prev["case"]["batch"]) ** 2 * (repeat + 1)
    return 3 * projected + 10


def repeats(prev: Optional[dict[str, Any]], batch: int) -> int:
    """Timed repeats after the first step: 3 while a step is under a second, then 2, then 1."""
    if prev is None or prev.get("ms") is None:
        return 3
    step = prev["ms"] / 1e3 * (batch / prev["case"]["batch"]) ** 2
    return 3 if step < 1 else 2 if step < 5 else 1


def run(methods: list[str], sizes: list[int], dim: int, dtype: str, device: str, deadline: float,
        floor3_ms: Callable[[int], float], pythonpath: list[str], log: Callable[[str], None],
        first_s: float = 90.0, max_case_s: float = 60.0, stall_s: float = 3.0,
        on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """All cases of all methods until `deadline`; returns {"rows", "methods", "not_run"}. A case is
    skipped where its projection (previous B's time x (B / previous B)^2 x (repeats + 1)) exceeds
    max_case_s or the time left."""
    from megabatch.bench import peers
    from megabatch.bench.single import Case, Result, skip_reason

    log(f"\n== 3. megabatch vs peers: {dtype}, D={dim}, B={sizes}, one worker process per method ==")
    workers = {m: Worker(m, device, pythonpath, log) for m in methods}
    not_run: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    try:
        for m, w in workers.items():  # every worker imports at once; wait for each in turn
            msg = w.ask(min(deadline - time.time(), first_s))
            if not msg.get("ready"):
                not_run[m] = msg.get("why") or msg.get("error", "?")
                log(f"{m}: not run ({not_run[m]})")
                w.kill()
        live = [m for m in methods if m not in not_run]
        log(f"methods: {', '.join(live)}")
        last: dict[tuple[str, str], dict[str, Any]] = {}
        for batch in sorted(sizes):
            for m in live:
                for loss in peers.PEERS.get(m, ("clip", "siglip")):
                    prev = last.get((m, loss))
                    rep = repeats(prev, batch)
                    case = Case(loss, m, batch, dim, dtype, device, rep)
                    left = deadline - time.time()
                    limit = min(stall_s if m == "stall" else case_limit(prev, batch, rep, first_s), left)
                    prev_res = (Result(Case(**prev["case"]), ms=prev.get("ms"), error=prev.get("error"))
                                if prev else None)
                    why = skip_reason(prev_res, case, min(max_case_s, left))
                    why = why.replace("--max-seconds", "the limit") if why else None
                    if why is None and not workers[m].alive():
                        why = "skipped: its worker was killed at a smaller B"
                    if why is None and left < 1:
                        why = "skipped: section budget spent"
                    if why is not None:
                        row = dict(case=asdict(case), error=why)
                    else:
                        t = time.time()
                        workers[m].send(asdict(case))
                        row = workers[m].ask(limit)
                        row.setdefault("case", asdict(case))
                        row["wall_s"] = round(time.time() - t, 2)
                    if row.get("ms") is not None:
                        row["floor3_ms"] = floor3_ms(batch)
                        row["floor_ratio"] = row["ms"] / row["floor3_ms"]
                        log(f"{m:14} {loss:6} B={batch:<8} {row['ms']:10.2f} ms  peak {row['peak_mib'] / 1024:7.2f} GiB"
                            f"  ratio {row['floor_ratio']:6.2f}  (wall {row['wall_s']:.0f} s)")
                    else:
                        log(f"{m:14} {loss:6} B={batch:<8} {row.get('error')}")
                    last[(m, loss)] = row
                    rows.append(row)
                    on_row(row)
    finally:
        for w in workers.values():
            w.close()
    return dict(rows=rows, methods=methods, not_run=not_run)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3])
elif __name__ == "__main__":
    sys.exit("usage: gpu_check_peers.py --worker METHOD DEVICE (started by benchmarks/gpu_check.py)")
