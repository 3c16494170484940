"""Run outputs in text: metrics.jsonl (one JSON object per logged step) and the end-of-run summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import TrainConfig


class MetricsLog:
    """Appends records to a JSONL file; on resume keeps only the records up to `keep_until`."""

    def __init__(self, path: Path, keep_until: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= keep_until]
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


_ROWS = (("zero_shot_top1", "zero-shot top-1 (mean over tasks)"), ("i2t_r1", "image->text R@1"),
         ("i2t_r5", "image->text R@5"), ("i2t_r10", "image->text R@10"), ("t2i_r1", "text->image R@1"),
         ("t2i_r5", "text->image R@5"), ("t2i_r10", "text->image R@10"))


def summary(cfg: TrainConfig, world: int, final: dict[str, Any], seconds: float) -> str:
    """A short table of the final held-out metrics against chance."""
    lines = [
        f"megabatch train: {cfg.steps} steps of {cfg.loss} at global batch {cfg.batch_size} "
        f"({world} rank(s) x {cfg.batch_size // world}, micro-batch {cfg.micro_batch_size}) on {cfg.data}: "
        f"{seconds:.0f} s this session",
    ]
    if final:
        lines.append(f"held-out eval at step {final['step']} ({final['n_images']} images, {final['n_texts']} "
                     f"distinct captions):")
        chance = final.get("chance", {})
        tasks = sorted(k for k in final if k.startswith("zero_shot_") and k != "zero_shot_top1")
        rows = list(_ROWS) + [(k, f"  zero-shot {k[10:-5]}") for k in tasks]
        for key, label in rows:
            if key in final:
                lines.append(f"  {label:<36} {100 * final[key]:6.1f}%   (chance {100 * chance.get(key, 0):5.1f}%)")
    lines.append(f"outputs: {cfg.output}/ (metrics.jsonl, eval.json, curves.png, checkpoints/)")
    return "\n".join(lines)
