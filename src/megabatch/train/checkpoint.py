"""Checkpoints that resume a run exactly: the same loss curve as if it had never stopped.

A checkpoint (`<output>/checkpoints/step_000123.pt`, written by rank 0, atomically) holds the
completed step, the config, model / optimizer / scheduler state, the tokenizer, the evaluation
history, and for every rank its RNG states (python, numpy, torch CPU and CUDA) and its data
stream's position. Synthetic and digits streams are addressed by (seed, step, index), so the step
is their position; file streams add their own state.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import TrainConfig

_NAME = re.compile(r"step_(\d+)\.pt$")
# Fields a resumed run may change; anything else would change the run it continues.
RESUMABLE = {"steps", "output", "resume", "eval_every", "log_every", "ckpt_every", "keep_checkpoints", "progress",
             "strategy", "backend", "device", "micro_batch_size", "threads", "eval_data", "eval_size"}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any], keep: int) -> None:
    """Write `payload` to `path` atomically, then delete all but the newest `keep` checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    old = sorted(p for p in path.parent.iterdir() if _NAME.search(p.name))
    for p in old[:-keep]:
        p.unlink()


def latest(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run directory."""
    p = Path(path)
    if p.is_file():
        return p
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = sorted(q for q in folder.glob("step_*.pt") if _NAME.search(q.name)) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (expected a step_*.pt file or a run directory)")
    return found[-1]


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(latest(path), map_location="cpu", weights_only=False)


def resume_config(path: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config, with the flags given now applied where that keeps the run the same."""
    saved = TrainConfig.from_dict(load(path)["config"])
    changes: dict[str, Any] = {}
    for key, value in given.items():
        current = getattr(saved, key, None) if hasattr(saved, key) else getattr(saved.model, key, None)
        if value == current:
            continue
        if key not in RESUMABLE:
            raise ValueError(f"--resume continues the saved run: --{key.replace('_', '-')} cannot change "
                             f"(saved {current!r}, given {value!r})")
        changes[key] = value
    cfg = dataclasses.replace(saved, **changes)
    cfg.resume = str(path)
    return cfg.validate()


def checkpoint_path(output: str | Path, step: int) -> Path:
    return Path(output) / "checkpoints" / f"step_{step:06d}.pt"


def gathered(obj: Any, world: int) -> list[Any]:
    """`obj` from every rank (a one-element list when not distributed)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Optional[Any]] = [None] * world
    dist.all_gather_object(out, obj)
    return out
