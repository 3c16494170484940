"""The time model's table for docs/performance.md: CLIP and SigLIP at global batch 32k, 256k and 1M on 64, 256
and 1,024 H200s (D = 512, bfloat16, 141 GB a GPU), each strategy's fastest backend that fits, the winner and the
terms that decide it. Everything here is predicted (src/megabatch/timemodel.py's assumed rates).

    python benchmarks/time_table.py [--gpu H200] [--dim 512]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch.cli import main as cli  # noqa: E402


def _plan(loss: str, world: int, batch: int, dim: int, gpu: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli(["plan", "--loss", loss, "--world", str(world), "--batch", str(batch), "--dim", str(dim), "--time",
             "--json", "--gpu", gpu, "--gpu-mem", "141GB"])
    return json.loads(out.getvalue())


def _cell(r: dict) -> str:
    t = r["time_terms"]
    exposed = 1e3 * (t["transfer_s"] - t["hidden_s"])
    return (f"{r['time_ms']:.1f} ({r['backend']}: compute {1e3 * t['compute_s']:.1f}, transfer {exposed:.1f}, "
            f"latency {1e3 * t['latency_s']:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H200")
    p.add_argument("--dim", type=int, default=512)
    a = p.parse_args()
    print("| loss | B | W | b | ring ms | gather ms | winner |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("clip", "siglip"):
        for batch in (32768, 262144, 1048576):
            for world in (64, 256, 1024):
                o = _plan(loss, world, batch, a.dim, a.gpu)
                best: dict[str, dict] = {}
                for r in o["options"]:
                    if r["fits"] and (r["strategy"] not in best or r["time_ms"] < best[r["strategy"]]["time_ms"]):
                        best[r["strategy"]] = r
                ring, gather = best.get("ring"), best.get("gather")
                print(f"| {loss} | {batch:,} | {world:,} | {-(-batch // world):,} | {_cell(ring) if ring else '-'} | "
                      f"{_cell(gather) if gather else 'does not fit'} | {o['strategy']} ({o['backend']}) |")


if __name__ == "__main__":
    main()
