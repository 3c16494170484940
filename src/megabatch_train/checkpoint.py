"""Checkpoints that resume a run exactly: the same loss curve as if it had never stopped.

A checkpoint (`<output>/checkpoints/step_000123.pt`, written by rank 0) holds the completed step,
the config, model / optimizer / scheduler state, the tokenizer, the evaluation history, the count
of skipped non-finite steps, and for every rank its RNG states (python, numpy, torch CPU and CUDA)
and its data stream's position. Synthetic and digits streams are addressed by (seed, step, index),
so the step is their position; file streams add their own state.

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

Same run or another (docs/operations.md, Resuming): a checkpoint holds the config twice, as the
user gave it ("given_config", before the run fitted anything) and as it ran ("config": with the
values the app fits when the run is built -- the context length a BPE tokenizer fits to csv/wds
captions, a Hugging Face model's image size and context). A run whose --output holds checkpoints is
the same run when the settings given now equal the given ones saved (the fitted fields also accept
the fitted value); the fitted values are then restored from the checkpoint, not fitted again.
Checkpoints from before "given_config" compare their config without the fitted fields. The data
files a run read are fingerprinted ("data_files": a table's size, modification time and sha256, a
shard list's sizes and times); a resume whose files differ warns, naming them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .runconfig import TrainConfig

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TMP = re.compile(r"^\.step_\d+\.pt\..*\.tmp$")
# Fields a resumed run may change; anything else would change the run it continues.
RESUMABLE = {"steps", "output", "resume", "eval_every", "log_every", "ckpt_every", "keep_checkpoints", "progress",
             "strategy", "backend", "device", "micro_batch_size", "threads", "eval_data", "eval_size", "fresh",
             "dist_timeout", "max_bad_steps", "fsdp"}


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


# Model fields the app may fit when a run is built (loop._build): the context length (0 for csv/wds:
# fitted to the training captions; a Hugging Face tokenizer's, capped by its model) and a Hugging
# Face model's image size. Their given value is compared; the fitted one is restored on resume.
FITTED = ("context_length", "image_size")
# Model fields with a flag of another name (the rest: --field-name, or set by --preset only).
_MODEL_FLAGS = {"source": "--model"}


def fitted_fields(cfg: TrainConfig) -> set[str]:
    """The model fields whose value the run fits at build time rather than takes as given."""
    hf = cfg.model.source.startswith("hf:")
    return ({"context_length"} if cfg.model.context_length == 0 or hf else set()) | ({"image_size"} if hf else set())


def flag_of(name: str, model: bool = False) -> str:
    """The command-line flag of a config field (a model field without a flag: its --preset's)."""
    from .runconfig import MODEL_FLAGS as with_flags

    if not model:
        return "--" + name.replace("_", "-")
    if name in _MODEL_FLAGS:
        return _MODEL_FLAGS[name]
    return "--" + name.replace("_", "-") if name in with_flags else f"model.{name} (--preset)"


def saved_configs(payload: dict[str, Any]) -> tuple[TrainConfig, TrainConfig, bool]:
    """(the config as given, the config as it ran, whether the given one was saved): checkpoints
    from before "given_config" hold the config as it ran only."""
    ran = TrainConfig.from_dict(payload["config"])
    given = payload.get("given_config")
    return (TrainConfig.from_dict(given), ran, True) if given else (ran, ran, False)


def _same(name: str, now: Any, given: Any, ran: Any, fitted: bool) -> bool:
    """A model field is unchanged: as given then, or (a fitted field) as fitted then."""
    return now == given or (fitted and name in FITTED and now == ran)


def differences(payload: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings of `cfg` (as given now) that differ from the run saved in `payload`, as
    "--flag (saved X, now Y)"; the fields resume may change (RESUMABLE) are not compared."""
    given, ran, has_given = saved_configs(payload)
    skip = set() if has_given else fitted_fields(cfg)  # an old checkpoint: its fitted values are not choices
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE or f.name == "model":
            continue
        if getattr(given, f.name) != getattr(cfg, f.name):
            diffs.append(f"{flag_of(f.name)} (saved {getattr(given, f.name)!r}, now {getattr(cfg, f.name)!r})")
    for f in dataclasses.fields(given.model):
        now, then = getattr(cfg.model, f.name), getattr(given.model, f.name)
        if f.name in skip or _same(f.name, now, then, getattr(ran.model, f.name), True):
            continue
        diffs.append(f"{flag_of(f.name, model=True)} (saved {then!r}, now {now!r})")
    return diffs


def check_same_run(payload: dict[str, Any], cfg: TrainConfig, path: Path, count: int = 1) -> None:
    """Raise CheckpointError if `path` (holding `payload`, the newest of `count` checkpoints)
    belongs to a run with other settings than `cfg`'s as given."""
    diffs = differences(payload, cfg)
    if diffs:
        raise CheckpointError(
            f"{cfg.output} holds checkpoints of another run ({path.name}, step {payload.get('step', '?')}); "
            f"these settings differ: {', '.join(diffs)}. To train with these settings, give another "
            f"--output NEW_DIR (that run stays as it is); to continue it, give its settings (in "
            f"{Path(cfg.output) / 'config.json'}); --fresh deletes its {count} checkpoint(s) and starts over")


def resume_config(path: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config (as it was given: fitted values are restored from the checkpoint when the
    run is built), with the flags given now applied where that keeps the run the same."""
    payload = load(path)
    saved, ran, _ = saved_configs(payload)
    changes: dict[str, Any] = {}
    for key, value in given.items():
        model = not hasattr(saved, key)
        current = getattr(saved.model, key, None) if model else getattr(saved, key)
        if value == current or model and _same(key, value, current, getattr(ran.model, key, None), True):
            continue
        if key not in RESUMABLE:
            raise ValueError(f"--resume continues the saved run: {flag_of(key, model).split()[0]} cannot change "
                             f"(saved {current!r}, given {value!r})")
        changes[key] = value
    cfg = dataclasses.replace(saved, **changes)
    cfg.resume = str(path)
    return cfg.validate()


# Tables up to this size are hashed, larger ones compared by size and time: sha256 ran at 1,215 MiB/s on
# this 2-core machine, loaded (hashlib over 256 MiB of os.urandom in 1 MiB blocks), ~0.2 s at start.
HASH_LIMIT = 256 << 20


def _fingerprint_file(path: str) -> dict[str, Any]:
    st = os.stat(path)
    digest = None
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def data_files(cfg: TrainConfig) -> dict[str, Any]:
    """What the run's --data / --eval-data files are now: a csv table's size, modification time and
    sha256; a wds pattern's shards with their sizes and times. Built-in data has none. Files that
    cannot be read are left out (the data loader reports them)."""
    from .files import expand_urls

    out: dict[str, Any] = {}
    for flag, spec in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        kind, _, path = (spec or "").partition(":")
        try:
            if kind == "csv" and path:
                out[flag] = {"spec": spec, "table": _fingerprint_file(path)}
            elif kind == "wds" and path:
                shards = []
                for shard in expand_urls(path):
                    st = os.stat(shard)
                    shards.append({"path": os.path.abspath(shard), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
                out[flag] = {"spec": spec, "shards": shards}
        except (OSError, ValueError):
            continue
    return out


def _file_change(then: dict[str, Any], now: dict[str, Any]) -> Optional[str]:
    if then["path"] != now["path"]:
        return f"now {now['path']} (was {then['path']})"
    if then.get("sha256") and now.get("sha256"):
        if then["sha256"] == now["sha256"]:
            return None  # touched, same rows
    elif (then["size"], then["mtime_ns"]) == (now["size"], now["mtime_ns"]):
        return None
    size = (f"{then['size']:,} -> {now['size']:,} bytes" if then["size"] != now["size"]
            else f"{now['size']:,} bytes, other content" if then.get("sha256") else f"{now['size']:,} bytes")
    return f"{size}, modified {_when(then['mtime_ns'])} -> {_when(now['mtime_ns'])}"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data files of a checkpoint (`saved`, from data_files then) differ from `now`: one
    phrase per flag whose files changed (none for checkpoints without fingerprints)."""
    changes = []
    for flag, then in saved.items():
        cur = now.get(flag)
        if cur is None or cur["spec"] != then["spec"]:
            continue  # other data is a setting (compared), unreadable data an error of its own
        if "table" in then:
            what = _file_change(then["table"], cur["table"])
            if what:
                changes.append(f"{flag} {then['spec']}: the table changed ({what})")
            continue
        old = {s["path"]: s for s in then["shards"]}
        new = {s["path"]: s for s in cur["shards"]}
        parts = []
        added, gone = [p for p in new if p not in old], [p for p in old if p not in new]
        if added:
            parts.append(f"{len(added)} shard(s) added ({', '.join(Path(p).name for p in added[:3])}"
                         f"{', ...' if len(added) > 3 else ''})")
        if gone:
            parts.append(f"{len(gone)} shard(s) gone ({', '.join(Path(p).name for p in gone[:3])}"
                         f"{', ...' if len(gone) > 3 else ''})")
        for p in (p for p in new if p in old):
            what = _file_change(old[p], new[p])
            if what:
                parts.append(f"{Path(p).name} changed ({what})")
        if parts:
            changes.append(f"{flag} {then['spec']}: {'; '.join(parts[:4])}{'; ...' if len(parts) > 4 else ''}")
    return changes


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
