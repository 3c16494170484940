"""Whether a checkpoint belongs to the run being started, and the config a resume continues with.

Same run or another (docs/operations.md, Resuming): a checkpoint holds the config twice, as the
user gave it ("given_config", before the run fitted anything) and as it ran ("config": with the
values the app fits when the run is built -- the context length a BPE tokenizer fits to csv/wds
captions, a Hugging Face model's image size and context). A run whose --output holds checkpoints is
the same run when the settings given now equal the given ones saved (the fitted fields also accept
the fitted value); the fitted values are then restored from the checkpoint, not fitted again.
Checkpoints from before "given_config" compare their config without the fitted fields. The data
files a run read are fingerprinted ("data_files": a table's size, modification time and sha256, a
shard list's sizes and times, WordNet's four data files' sizes, times and sha256); a resume whose
files differ warns, naming them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..config.sections import MODEL_FLAGS, TrainConfig
from .checkpoint import CheckpointError, load

# Fields a resumed run may change; anything else would change the run it continues.
RESUMABLE = {"steps", "output", "resume", "eval_every", "log_every", "ckpt_every", "keep_checkpoints", "progress",
             "strategy", "backend", "device", "micro_batch_size", "threads", "eval_data", "eval_size", "fresh",
             "dist_timeout", "max_bad_steps", "fsdp"}

# Model fields the app may fit when a run is built (build._build): the context length (0 for csv/wds:
# fitted to the training captions; a Hugging Face tokenizer's, capped by its model) and a Hugging
# Face model's image size. Their given value is compared; the fitted one is restored on resume.
FITTED = ("context_length", "image_size")
# Model fields with a flag of another name (the rest: --field-name, or set by --preset only).
_FLAG_NAMES = {"source": "--model"}


def fitted_fields(cfg: TrainConfig) -> set[str]:
    """The model fields whose value the run fits at build time rather than takes as given."""
    hf = cfg.model.source.startswith("hf:")
    return ({"context_length"} if cfg.model.context_length == 0 or hf else set()) | ({"image_size"} if hf else set())


def flag_of(name: str, model: bool = False) -> str:
    """The command-line flag of a config field (a model field without a flag: its --preset's)."""
    if not model:
        return "--" + name.replace("_", "-")
    if name in _FLAG_NAMES:
        return _FLAG_NAMES[name]
    return "--" + name.replace("_", "-") if name in MODEL_FLAGS else f"model.{name} (--preset)"


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
    sha256; a wds pattern's shards with their sizes and times; WordNet's data files (where
    wordnet.py reads them) with their sizes, times and sha256. The other built-in data has none.
    Files that cannot be read are left out (the data loader reports them)."""
    from ..data import wordnet
    from ..data.files.shards import expand_urls

    out: dict[str, Any] = {}
    for flag, parsed in (("--data", cfg.data_spec), ("--eval-data", cfg.eval_spec)):
        if parsed is None:
            continue
        spec, kind, path = str(parsed), parsed.kind, parsed.path
        try:
            if kind == "csv":
                out[flag] = {"spec": spec, "table": _fingerprint_file(path)}
            elif kind == "wordnet":
                out[flag] = {"spec": spec, "files": [_fingerprint_file(str(p)) for p in wordnet.data_paths()]}
            elif kind == "wds":
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
        key = "shards" if "shards" in then else "files"
        if key not in cur:
            continue
        old = {s["path"]: s for s in then[key]}
        new = {s["path"]: s for s in cur[key]}
        parts = []
        added, gone = [p for p in new if p not in old], [p for p in old if p not in new]
        unit = "shard(s)" if key == "shards" else "file(s)"
        if added:
            parts.append(f"{len(added)} {unit} added ({', '.join(Path(p).name for p in added[:3])}"
                         f"{', ...' if len(added) > 3 else ''})")
        if gone:
            parts.append(f"{len(gone)} {unit} gone ({', '.join(Path(p).name for p in gone[:3])}"
                         f"{', ...' if len(gone) > 3 else ''})")
        for p in (p for p in new if p in old):
            what = _file_change(old[p], new[p])
            if what:
                parts.append(f"{Path(p).name} changed ({what})")
        if parts:
            changes.append(f"{flag} {then['spec']}: {'; '.join(parts[:4])}{'; ...' if len(parts) > 4 else ''}")
    return changes
