"""Checkpoint files that resume a run exactly: the same loss curve as if it had never stopped.

A checkpoint (`<output>/checkpoints/step_000123.pt`, written by rank 0) holds the completed step,
the config, model / optimizer / scheduler state, the tokenizer, the evaluation history, the count
of skipped non-finite steps, and for every rank its RNG states (python, numpy, torch CPU and CUDA)
and its data stream's position. Synthetic and digits streams are addressed by (seed, step, index),
so the step is their position; file streams add their own state. Whether a checkpoint belongs to
the run being started is identity.py's.

Safety and atomicity:
  * written to a hidden temp file in the same folder, flushed and fsync'ed, renamed over the final
    name, then the folder is fsync'ed: a crash leaves either the old set or the new file, never a
    half-written `step_*.pt`; temp files a crash left behind are deleted by the next save/start;
  * loaded with `torch.load(weights_only=True)`: only tensors and plain containers unpickle, so a
    checkpoint cannot run code. The RNG states are stored as tensors and plain tuples for that
    reason (numpy's state array travels as an int64 tensor);
  * a newest checkpoint that does not load (truncated, corrupt) is skipped with a warning and the
    previous one is used, when a run directory is given; an explicit file that does not load is an
    error.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TMP = re.compile(r"^\.step_\d+\.pt\..*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or of a run with other settings."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain tuples (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files an interrupted save left in `folder` (only rank 0 writes checkpoints, so
    any temp file present when rank 0 starts or saves is stale). Returns what was deleted."""
    gone = [p for p in folder.iterdir() if _TMP.match(p.name)] if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def save(path: Path, payload: dict[str, Any], keep: int) -> None:
    """Write `payload` to `path` atomically and durably, then keep only the newest `keep` checkpoints."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the folder may be gone: keep the save's own error
            tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    for p in checkpoints(folder)[:-keep]:
        p.unlink()


def checkpoints(folder: Path) -> list[Path]:
    """The `step_*.pt` files of `folder`, oldest first (by step)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def _folder(path: str | Path) -> Path:
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def read(path: Path) -> dict[str, Any]:
    """One checkpoint file, unpickled with weights_only=True. Raises CheckpointError if unreadable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, a forbidden global: all unusable
        text = str(e)
        if "Weights only load failed" in text:  # torch's own advice (load with weights_only=False) runs the code
            named = re.search(r"GLOBAL\s+([\w.]+)", text)
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded safely: it holds a Python object that a weights-only load "
                f"refuses{f' ({named.group(1)})' if named else ''}, and unpickling it could run code stored in "
                "the file. megabatch writes checkpoints of tensors and plain containers only: if this file is "
                "your own, re-save it that way from the process that made it; otherwise use a checkpoint you "
                "trust") from e
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {type(e).__name__}: "
                              f"{text.splitlines()[0] if text else ''}") from e
    if not isinstance(payload, dict) or "config" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a megabatch checkpoint (no config)")
    return payload


def load_latest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file as given, or the newest loadable checkpoint of a run directory.

    In a directory, a newest checkpoint that does not load is skipped with a warning (a crash
    during a save on a filesystem without atomic rename, a truncated copy) and the one before is
    used. Raises FileNotFoundError when there is none, CheckpointError when none loads.
    """
    p = Path(path)
    if p.is_file():
        return p, read(p)
    found = checkpoints(_folder(p))
    if not found:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a step_*.pt file or a run directory)")
    errors = []
    for candidate in reversed(found):
        try:
            payload = read(candidate)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}; trying the previous checkpoint", stacklevel=2)
            errors.append(str(e))
            continue
        return candidate, payload
    raise CheckpointError("no checkpoint loads: " + "; ".join(errors))


def latest(path: str | Path) -> Path:
    """The path of the checkpoint `load_latest` would use."""
    return load_latest(path)[0]


def load(path: str | Path) -> dict[str, Any]:
    return load_latest(path)[1]


def fit_scalar_shapes(state: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """`state` (a model state dict) with its one-element tensors reshaped to `like`'s shapes (0-dim <->
    (1,)): checkpoints from before logit_scale / logit_bias became shape (1,) for FSDP2 load into
    today's model, and today's into a user model with 0-dim parameters."""
    out = dict(state)
    for key, value in state.items():
        ref = like.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor) and value.numel() == ref.numel() == 1
                and value.shape != ref.shape):
            out[key] = value.reshape(ref.shape)
    return out


def fit_optimizer_shapes(state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """`state` (`optimizer.state_dict()` format) with each one-element parameter's state tensors
    (AdamW's moments; not its step count) reshaped to the parameter's shape, as fit_scalar_shapes.
    `params`: the optimizer's parameters in its order."""
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        return state  # load_state_dict reports the mismatch
    shapes = {i: p.shape for i, p in zip(ids, params)}

    def fit(key: str, value: Any, shape: torch.Size) -> Any:
        if (key != "step" and isinstance(value, torch.Tensor) and value.numel() == math.prod(shape) == 1
                and value.shape != shape):
            return value.reshape(shape)
        return value

    fitted = {i: {k: fit(k, v, shapes[i]) for k, v in s.items()} if i in shapes else s
              for i, s in state["state"].items()}
    return {**state, "state": fitted}


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
