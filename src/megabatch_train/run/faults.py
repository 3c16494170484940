"""Deliberate faults for the fault tests and drills: `MEGABATCH_FAULT="kind@steps[:rank],..."`.

Kinds (steps are 1-based completed-step numbers; `a-b` is a range; rank defaults to every rank):
  kill@K:R   SIGKILL rank R right after the update of step K (before that step's checkpoint);
  nan@K:R    rank R's gradients at step K are NaN (the step must be skipped on every rank);
  hang@K:R   rank R sleeps before step K's loss instead of calling it (the others must time out);
  term@K:R   rank R sends itself SIGTERM before step K's loss (every rank must stop after step K,
             with a checkpoint at K); usr1@K:R the same with SIGUSR1;
  slow@K:R   rank R sleeps SLOW_S seconds before step K's loss (so that a signal sent from outside
             after some step lands well before the run ends).
Faults fire only on the first attempt (TORCHELASTIC_RESTART_COUNT 0), so a run restarted by
torchrun goes on. Unset, the variable costs one dictionary lookup per step.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

from torch import nn

KINDS = ("kill", "nan", "hang", "term", "usr1", "slow")
SIGNALS = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1}
SLOW_S = 0.5


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: Optional[int]

    def hits(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.first <= step <= self.last and self.rank in (None, rank)


def parse(spec: str) -> list[Fault]:
    """Faults from a MEGABATCH_FAULT value; ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            kind, _, where = part.partition("@")
            steps, _, rank = where.partition(":")
            first, _, last = steps.partition("-")
            fault = Fault(kind, int(first), int(last or first), int(rank) if rank else None)
        except ValueError:
            fault = None
        if fault is None or fault.kind not in KINDS or fault.first < 1 or fault.last < fault.first:
            raise ValueError(f"MEGABATCH_FAULT: {part!r} is not KIND@STEP[-STEP][:RANK] with KIND one of "
                             f"{', '.join(KINDS)}")
        faults.append(fault)
    return faults


class Injector:
    """The faults of this process (none unless MEGABATCH_FAULT is set on the first attempt)."""

    def __init__(self, rank: int, spec: Optional[str] = None):
        spec = os.environ.get("MEGABATCH_FAULT", "") if spec is None else spec
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        self.rank = rank
        self.faults = parse(spec) if spec and first_attempt else []

    def _hit(self, kind: str, step: int) -> bool:
        return any(f.hits(kind, step, self.rank) for f in self.faults)

    def before_loss(self, step: int) -> None:
        if not self.faults:
            return
        for kind, sig in SIGNALS.items():
            if self._hit(kind, step):
                signal.raise_signal(sig)  # handled before it returns: the flag is up for this step's check
        if self._hit("slow", step):
            time.sleep(SLOW_S)
        if self._hit("hang", step):
            time.sleep(3600)

    def after_backward(self, step: int, model: nn.Module) -> None:
        if self.faults and self._hit("nan", step):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def after_update(self, step: int) -> None:
        if self.faults and self._hit("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
