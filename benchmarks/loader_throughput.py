"""How fast `megabatch train` reads users' files, and how many loader workers a GPU step needs.

    PYTHONPATH=src python benchmarks/loader_throughput.py [--out benchmarks/loader_cpu.json]

Writes two image sets to a temporary folder -- 32 px PNGs (CIFAR-sized) and 224 px JPEGs (photo-
sized; smooth colour fields plus noise, quality 90) -- with a csv table each, then measures:
1. loader only: pairs/s of `FileStream.batch` (decode, crop, resize, collate, hand-over,
   normalise) at 0, 1 and 2 DataLoader workers, after the workers have started;
2. per worker: the 1-worker rate (the training process only receives), against what a training
   step consumes: `megabatch train --preset tiny` at batch 256, samples/s of the step alone
   (synthetic data) and on the same table at 0, 1, 2 workers (on a 2-core machine the workers
   take CPU from the step, so both numbers are reported);
3. workers a GPU step at a global batch of 32,768 needs: 32,768 / step time / per-worker rate (the
   best 1-worker rate), for a range of step times (no GPU was measured here), over all ranks.
Each setting is measured --repeats times; other jobs share the cores, so best and median are kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import PIL
import torch
from PIL import Image

from megabatch_train.config.sections import from_preset
from megabatch_train.data.files.stream import FileOptions, FileStream
from megabatch_train.run.loop import train


def photo(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field with noise: compresses and decodes like a photo, not like noise."""
    coarse = rng.random((4, 4, 3)) * 255
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8))


def make_set(folder: Path, n: int, size: int, fmt: str) -> Path:
    rng = np.random.default_rng(size)
    (folder / "img").mkdir(parents=True)
    ext = "png" if fmt == "PNG" else "jpg"
    lines = ["filepath\ttitle"]
    for i in range(n):
        photo(rng, size).save(folder / "img" / f"{i}.{ext}", format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        lines.append(f"img/{i}.{ext}\tpicture {i} of a {size} px set")
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.tsv"


def loader_rate(table: Path, image_size: int, workers: int, pairs: int, repeats: int) -> dict[str, float]:
    """Best and median of `repeats` measurements (other jobs share these cores: the best is the
    least disturbed one)."""
    runs = [_loader_rate(table, image_size, workers, pairs) for _ in range(repeats)]
    rates = sorted(r[0] for r in runs)
    return {"pairs_per_s_best": round(rates[-1], 1), "pairs_per_s_median": round(rates[len(rates) // 2], 1),
            "first_batch_s_median": round(sorted(r[1] for r in runs)[len(runs) // 2], 3)}


def _loader_rate(table: Path, image_size: int, workers: int, pairs: int, batch: int = 256) -> tuple[float, float]:
    stream = FileStream("csv", str(table), image_size, options=FileOptions(eval_split=0, workers=workers))
    t0 = time.perf_counter()
    stream.batch(0, batch, 0, batch)  # starts the workers
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = 0
    while done < pairs:
        stream.batch(0, batch, 0, batch)
        done += batch
    return done / (time.perf_counter() - t0), first


def train_rate(table: Optional[Path], workers: int, steps: int, out: Path) -> float:
    """samples/s of the second half of a tiny-preset run at batch 256 (workers started); without a
    table, on the synthetic set (rendered in ~3 ms per batch: the step alone)."""
    data = f"csv:{table}" if table is not None else "synthetic"
    extra = dict(workers=workers, eval_split=0) if table is not None else {}
    cfg = from_preset("tiny", data=data, batch_size=256, micro_batch_size=256, steps=steps, warmup_steps=1,
                      log_every=steps // 2, output=str(out), progress=False, **extra)
    train(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return round(records[-1]["samples_per_s"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/loader_cpu.json")
    ap.add_argument("--pairs", type=int, default=3072, help="pairs timed per loader measurement")
    ap.add_argument("--steps", type=int, default=16, help="training steps per step-rate measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per setting (best and median kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    result: dict = {
        "date": datetime.date.today().isoformat(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s) (shared), {platform.platform()}",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__},
        "loader": {}, "train_tiny_samples_per_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"png32": (make_set(Path(tmp) / "png32", 2048, 32, "PNG"), [32]),
                "jpeg224": (make_set(Path(tmp) / "jpeg224", 512, 224, "JPEG"), [64, 224])}
        for name, (table, sizes) in sets.items():
            for size in sizes:
                for workers in (0, 1, 2):
                    key = f"{name}->{size}px, {workers} worker(s)"
                    result["loader"][key] = loader_rate(table, size, workers, args.pairs, args.repeats)
                    print(key, result["loader"][key], flush=True)
        for workers in (0, 1, 2):
            rates = sorted(train_rate(sets["png32"][0], workers, args.steps, Path(tmp) / f"run{workers}-{i}")
                           for i in range(args.repeats))
            result["train_tiny_samples_per_s"][f"png32, {workers} worker(s)"] = {"best": rates[-1],
                                                                              "median": rates[len(rates) // 2]}
            print(f"train tiny on png32, {workers} worker(s): {rates} samples/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rates = sorted(train_rate(None, 0, args.steps, Path(tmp) / f"syn{i}") for i in range(args.repeats))
    result["train_tiny_step_only_samples_per_s"] = {"best": rates[-1], "median": rates[len(rates) // 2]}
    print(f"train tiny, step only (synthetic data): {rates} samples/s", flush=True)
    need = {}
    for name in ("png32->32px", "jpeg224->64px", "jpeg224->224px"):
        per_worker = result["loader"][f"{name}, 1 worker(s)"]["pairs_per_s_best"]
        need[name] = {f"step {t:g} s": math.ceil(32768 / t / per_worker) for t in (0.25, 0.5, 1.0, 2.0)}
    result["workers_for_32768_pairs_per_gpu_step"] = need
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(need, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
