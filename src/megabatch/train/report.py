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


def _row(label: str, value: float, chance: float | None) -> str:
    against = f"   (chance {100 * chance:5.1f}%)" if chance is not None else ""
    return f"  {label:<40} {100 * value:6.1f}%{against}"


def summary(cfg: TrainConfig, world: int, final: dict[str, Any], seconds: float) -> str:
    """A short table of the final held-out metrics against chance."""
    lines = [
        f"megabatch train: {cfg.steps} steps of {cfg.loss} at global batch {cfg.batch_size} "
        f"({world} rank(s) x {cfg.batch_size // world}, GradCache micro-batch {cfg.micro_batch_size}) on {cfg.data}: "
        f"{seconds:.0f} s",
    ]
    if final:
        chance = final.get("chance", {})
        about = final.get("eval_set") or f"{final['n_images']} images"
        lines.append(f"held-out eval at step {final['step']}: {about}")
        for task, classes in final.get("zero_shot_classes", {}).items():
            key = f"zero_shot_{task}_top1"
            lines.append(_row(f"zero-shot top-1, {task} ({classes}-way)", final[key], chance.get(key)))
        attributes = [k for k in final if k.startswith("zero_shot_") and k.endswith("_top1") and k != "zero_shot_top1"
                      and k[10:-5] not in final.get("zero_shot_classes", {})]
        for key in sorted(attributes):
            lines.append(_row(f"  its {key[10:-5]} right", final[key], chance.get(key)))
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            for k in (1, 5, 10):
                key = f"{direction}_r{k}"
                lines.append(_row(f"{label} R@{k} ({final['n_texts']} captions)", final[key], chance.get(key)))
    lines.append(f"outputs: {cfg.output}/ (metrics.jsonl, eval.json, curves.png, checkpoints/)")
    return "\n".join(lines)
