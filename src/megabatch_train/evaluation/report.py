"""Run outputs in text: metrics.jsonl (one JSON object per logged step) and the end-of-run summary."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config.sections import TrainConfig


class MetricsLog:
    """Appends records to a JSONL file; on resume keeps only the records up to `keep_until`.

    A record that cannot be appended (disk full, the folder gone) is a warning, not the end of the
    run: the records stay in memory and the whole file is written again at the next append that can.
    """

    def __init__(self, path: Path, keep_until: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._behind = False  # a write failed: the file lacks records, rewrite it whole
        if keep_until and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= keep_until]
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        behind = self._behind
        try:
            with self.path.open("w" if behind else "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in (self.records if behind else [record]))
        except OSError as e:
            if not behind:
                warnings.warn(f"{self.path}: step {record['step']}'s metrics could not be written ({e}); they are "
                              "kept, and the file is written whole at the next record that can be", stacklevel=2)
            self._behind = True
        else:
            self._behind = False


def percent(fraction: float) -> str:
    """A fraction as a percentage with at least two significant digits: 0.00055 -> "0.055%"."""
    value = 100 * fraction
    if value == 0 or not math.isfinite(value):
        return f"{value:.1f}%"
    decimals = max(1, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}%"


def _row(label: str, value: float, chance: Optional[float]) -> str:
    against = f"   (chance {percent(chance)})" if chance is not None else ""
    if chance is not None and chance >= 0.5:  # evaluate.MEANINGLESS_CHANCE
        against += "   not meaningful: chance >= 50%"
    return f"  {label:<40} {percent(value):>7}{against}"


def text_notes(tokenizer: Any, eval_data: Any) -> list[str]:
    """How the captions were tokenized, and how many the context cuts (training, evaluation)."""
    describe = getattr(tokenizer, "describe", None)
    if not callable(describe):
        return []
    lines = [f"captions: {describe()}"]
    if eval_data is not None and hasattr(tokenizer, "lengths"):
        from ..data.tokenizer import truncation

        t = truncation(tokenizer, eval_data.captions)
        merged = f", {t['merged']:,} distinct ones no longer told apart" if t["merged"] else ""
        lines.append(f"  evaluation captions truncated: {t['truncated']:,} of {t['captions']:,}{merged}")
    return lines


OUTPUTS = ("metrics.jsonl", "eval.json", "curves.png", "config.json", "checkpoints/")


def summary(cfg: TrainConfig, world: int, final: dict[str, Any], seconds: float,
            notes: Sequence[str] = ()) -> str:
    """A short table of the final held-out metrics against chance, and the outputs written."""
    lines = [
        f"megabatch train: {cfg.steps} steps of {cfg.loss} at global batch {cfg.batch_size} "
        f"({world} rank(s) x {cfg.batch_size // world}, GradCache micro-batch {cfg.micro_batch_size}) on {cfg.data}, "
        f"{cfg.resolved_positives()} positives: {seconds:.0f} s",
    ]
    lines += list(notes)
    if final:
        chance = final.get("chance", {})
        about = final.get("eval_set") or f"{final['n_images']} images"
        lines.append(f"held-out eval at step {final['step']}: {about}")
        if final.get("non_finite"):
            lines.append(f"  NOT SCORED, every metric is NaN: the model is not finite ({final['non_finite']})")
            lines.append(f"outputs: {cfg.output}/ ({', '.join(_written(cfg))})")
            return "\n".join(lines)
        meaningless = final.get("not_meaningful", [])
        if meaningless:
            lines.append(f"  {len(meaningless)} metric(s) below are not meaningful: guessing scores 50% or more "
                         "(eval.json: not_meaningful)")
        for task, classes in final.get("zero_shot_classes", {}).items():
            key = f"zero_shot_{task}_top1"
            lines.append(_row(f"zero-shot top-1, {task} ({classes}-way)", final[key], chance.get(key)))
        attributes = [k for k in final if k.startswith("zero_shot_") and k.endswith("_top1") and k != "zero_shot_top1"
                      and k[10:-5] not in final.get("zero_shot_classes", {})]
        for key in sorted(attributes):
            lines.append(_row(f"  its {key[10:-5]} right", final[key], chance.get(key)))
        query, caption = final.get("sides") or ("image", "text")
        gallery = f"{final['n_texts']} {'captions' if caption == 'text' else caption + 's'}"
        reference = final.get("zero_shot_model") or {}
        if "unavailable" in reference:
            lines.append(f"  no zero-shot model scores: {reference['unavailable']}")
        elif reference:
            lines.append(f"  beside each: {reference['model']}, untrained")
        for direction, label in (("i2t", f"{query}->{caption}"), ("t2i", f"{caption}->{query}")):
            for k in (1, 5, 10):
                key = f"{direction}_r{k}"
                zero = f"   zero-shot {percent(reference[key])}" if key in reference else ""
                lines.append(_row(f"{label} R@{k} ({gallery})", final[key], chance.get(key)) + zero)
    else:
        lines.append("no evaluation: no held-out data (--eval-split 0 and no --eval-data)")
    lines.append(f"outputs: {cfg.output}/ ({', '.join(_written(cfg))})")
    return "\n".join(lines)


def _written(cfg: TrainConfig) -> list[str]:
    out = Path(cfg.output)
    return [name for name in OUTPUTS if (out / name.rstrip("/")).exists()]
