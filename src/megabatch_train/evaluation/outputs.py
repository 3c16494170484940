"""The run directory (--output): proven writable before any work, and saves that fail without ending the run.

At start, rank 0 creates OUTPUT and OUTPUT/checkpoints and writes and deletes a probe file in each,
before the data is read or the model built; every rank learns the answer (one broadcast), so a
folder that cannot hold the run is a usage error on every rank at once (OutputError: exit 2, one
line), never a traceback, a hang, or weights lost at the first save.

Later, a checkpoint save that fails (disk full, the folder removed or made read-only) does not end
the run: `Saves` prints where the weights could not go and the OSError, training goes on, the
next save (every --ckpt-every steps, and the last step's) writes the newest state again, and the
summary names the newest checkpoint that was written. Small outputs (config.json, eval.json) that
cannot be written are warnings (`write_text`), as is curves.png (plots.py).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist


class OutputError(ValueError):
    """--output cannot hold the run's outputs (a usage error: exit 2)."""


def unusable(output: str | Path) -> Optional[str]:
    """Why `output` cannot hold a run (None if it can): OUTPUT and OUTPUT/checkpoints are created
    if missing, and a probe file is written, flushed and deleted in each."""
    out = Path(output)
    for folder in (out, out / "checkpoints"):
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create {folder}: {e.strerror or e}"
        probe = folder / f".megabatch-probe.{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"megabatch")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
            return f"cannot write in {folder}: {e.strerror or e}"
    return None


def check(output: str | Path, rank: int, world: int) -> None:
    """Raise OutputError on every rank if rank 0 finds `output` unusable (one broadcast when world > 1)."""
    verdict: list[Optional[str]] = [unusable(output) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise OutputError(f"--output {output}: {verdict[0]}")


def write_text(path: Path, text: str) -> bool:
    """Write a small output; a failure is a warning naming the file and the OSError. Returns success."""
    try:
        path.write_text(text)
        return True
    except OSError as e:
        warnings.warn(f"{path} was not written: {e}", stacklevel=2)
        return False


class Saves:
    """The checkpoints a run wrote and the ones it could not (rank 0)."""

    def __init__(self, newest: Optional[Path] = None, newest_step: int = 0):
        self.newest, self.newest_step = newest, newest_step  # a resumed run starts from its checkpoint
        self.failed: list[tuple[int, Path, OSError]] = []

    def wrote(self, path: Path, step: int) -> None:
        self.newest, self.newest_step = path, step
        if self.failed and self.failed[-1][0] < step:
            print(f"megabatch train: checkpoint {path} written (the save of step {self.failed[-1][0]} had failed)",
                  file=sys.stderr, flush=True)

    def failure(self, path: Path, step: int, error: OSError) -> None:
        self.failed.append((step, path, error))
        print(f"megabatch train: warning: step {step}'s checkpoint could not be written to {path}: {error}. "
              f"Training goes on; the next checkpoint save tries again. Newest checkpoint written: {self._newest()}",
              file=sys.stderr, flush=True)

    def _newest(self) -> str:
        return f"{self.newest} (step {self.newest_step})" if self.newest else "none"

    def notes(self) -> list[str]:
        """The summary's lines: the newest checkpoint written, and the saves that failed since."""
        lost = [f for f in self.failed if f[0] > self.newest_step]
        if not lost:
            return [f"newest checkpoint: {self._newest()}"] if self.newest else []
        step, path, error = lost[-1]
        return [f"newest checkpoint: {self._newest()}; NOT SAVED: step {step}'s weights could not be written to "
                f"{path}: {error}" + (f" ({len(lost)} failed saves)" if len(lost) > 1 else "")]


def describe_complete(output: str | Path, payload: dict[str, Any], path: Path, steps: int) -> str:
    """What a rerun of a finished run prints: it is complete, where its results are, how to go on."""
    out = Path(output)
    step = payload["step"]
    where = f"at --steps {steps}" if step == steps else f"past --steps {steps}"
    results = [str(out / name) for name in ("eval.json", "metrics.jsonl", "curves.png") if (out / name).exists()]
    evals = payload.get("evals") or []
    got = (f"; held-out eval at step {evals[-1]['step']} in {out / 'eval.json'}" if evals and
           (out / "eval.json").exists() else "")
    return (f"megabatch train: {out} is complete: its checkpoint {path.name} is at step {step}, {where}; "
            f"nothing to train{got}. Results: {', '.join(results) or 'none'}. To train on, give more --steps; "
            "for another run, another --output")
