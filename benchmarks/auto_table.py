"""What strategy="auto" picks (megabatch.plan.auto_choice, the cost model's `choose`, which the losses call
after their layout exchange) for W = 8, 64, 256, 1,024 ranks x global batch 32k, 256k, 1M: D = 512, bfloat16,
the triton backend (the losses' choice on CUDA), the H200 preset's rates, 8 ranks a node (hierarchical a
candidate). Each cell: the pick and its predicted ms a step; once with no memory limit and once with
--budget (a rank's memory beside the features, default 1 GiB). Everything here is predicted (assumed rates).

    python benchmarks/auto_table.py [--loss clip] [--gpu H200] [--budget-gib 1]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from megabatch import plan, timemodel  # noqa: E402

WORLDS = (8, 64, 256, 1024)
BATCHES = ((32768, "32k"), (262144, "256k"), (1048576, "1M"))


def cell(loss: str, world: int, batch: int, hw: timemodel.Hardware, gpu_mem: int | None) -> str:
    c = plan.auto_choice(loss, world, batch, 512, "bfloat16", backend="triton", hw=hw, gpu_mem=gpu_mem)
    pick = next(k for k in c.candidates if k.strategy == c.strategy)
    ms = 1e3 * pick.time_s
    text = f"{c.strategy} {ms:.3g}" if ms < 100 else f"{c.strategy} {ms:,.0f}"
    return text + ("" if pick.fits else " (nothing fits)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    p.add_argument("--gpu", default="H200", choices=tuple(timemodel.GPUS))
    p.add_argument("--budget-gib", type=float, default=1.0)
    a = p.parse_args()
    hw = timemodel.GPUS[a.gpu]
    budget = int(a.budget_gib * 2**30)
    print(f"| {a.loss}, {a.gpu} | " + " | ".join(f"W = {w:,}" for w in WORLDS) + " |")
    print("|---|" + "---|" * len(WORLDS))
    for label, mem in (("no limit", None), (f"{a.budget_gib:g} GiB", budget)):
        for batch, name in BATCHES:
            row = " | ".join(cell(a.loss, w, batch, hw, mem) for w in WORLDS)
            print(f"| {name}, {label} | {row} |")


if __name__ == "__main__":
    main()
