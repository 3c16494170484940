"""Restart drill: SIGKILL one rank of a `torchrun --max-restarts 1` training run, N times; report
whether the restarted workers started, where they resumed, and whether the run ended as an
uninterrupted one does.

    python benchmarks/restart_drill.py [--tries 5] [--kill-rank 1] [--after-step 6] [--src DIR]

The kill comes from outside (this script reads /proc to find the worker whose RANK is the one
asked for, once rank 0's metrics.jsonl shows the step), as a crash or the OOM killer would.
`--src` runs another checkout's sources (e.g. /work/main/src to measure the code before a fix).
Each try prints: exit code, whether gloo's init failed with "Connection refused", the step the
restarted run resumed from, and whether its final loss and evaluation equal the reference run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def run(out: Path, flags: list[str], env: dict[str, str], kill: tuple[int, int] | None, restarts: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "megabatch_train", *flags, "--output", str(out)]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        killed = False
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if kill and not killed and _steps(out) >= kill[1]:
                for child in _children(proc.pid):
                    if _rank_of(child) == kill[0]:
                        os.kill(child, signal.SIGKILL)
                        killed = True
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = log.read_text()
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    final = json.loads(lines[-1]) if lines else {}
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
    return {"rc": proc.returncode, "refused": "Connection refused" in text, "killed": killed,
            "resumed": resumed[0].split("(step ")[1].split(")")[0] if resumed else None,
            "loss": final.get("loss"), "step": final.get("step"), "i2t_r1": evaluation.get("i2t_r1")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--after-step", type=int, default=6)
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
    flags = ["--preset", "tiny", "--steps", str(args.steps), "--log-every", "1", "--ckpt-every", "4", "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        ref = run(Path(tmp) / "reference", flags, env, None, 0)
        print(f"src {args.src}; reference (uninterrupted): {ref}")
        ok = 0
        for i in range(args.tries):
            r = run(Path(tmp) / f"try{i}", flags, env, (args.kill_rank, args.after_step), 1)
            same = r["loss"] == ref["loss"] and r["i2t_r1"] == ref["i2t_r1"] and r["step"] == args.steps
            ok += r["rc"] == 0 and same and r["resumed"] is not None
            print(f"try {i}: {r} same_as_reference={same}", flush=True)
        print(f"{ok}/{args.tries} tries restarted, resumed from a checkpoint and ended as the uninterrupted run")


if __name__ == "__main__":
    main()
