"""The time model's table for docs/performance.md: CLIP and SigLIP at global batch 32k, 256k and 1M on 64, 256
and 1,024 H200s (D = 512, bfloat16, 141 GB a GPU, 8 a node), each strategy's fastest backend that fits (ring,
gather, hierarchical), the winner and the terms that decide it. Everything here is predicted
(src/megabatch/timemodel.py's assumed rates; hierarchical modelled from its design).

    python benchmarks/time_table.py [--gpu H200] [--dim 512] [--json benchmarks/time_table_h200.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from datetime import date

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
    p.add_argument("--json", help="also write every cell (each strategy's best option with its terms) here")
    a = p.parse_args()
    names = ("ring", "gather", "hierarchical")
    print("| loss | B | W | b | " + " | ".join(f"{s} ms" for s in names) + " | winner |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    cells = []
    for loss in ("clip", "siglip"):
        for batch in (32768, 262144, 1048576):
            for world in (64, 256, 1024):
                o = _plan(loss, world, batch, a.dim, a.gpu)
                best: dict[str, dict] = {}
                for r in o["options"]:
                    if r["fits"] and (r["strategy"] not in best or r["time_ms"] < best[r["strategy"]]["time_ms"]):
                        best[r["strategy"]] = r
                row = " | ".join(_cell(best[s]) if s in best else "does not fit" for s in names)
                print(f"| {loss} | {batch:,} | {world:,} | {-(-batch // world):,} | {row} | "
                      f"{o['strategy']} ({o['backend']}) |")
                cells.append({"loss": loss, "batch": batch, "world": world, "winner": o["strategy"],
                              "winner_backend": o["backend"], "best": best})
    if a.json:
        with open(a.json, "w") as f:
            command = "python benchmarks/time_table.py " + " ".join(sys.argv[1:])
            json.dump({"command": command, "date": str(date.today()), "gpu": a.gpu, "dim": a.dim, "status": "predicted (timemodel.py's assumed rates)",
                       "hardware": o["hardware"], "cells": cells}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
