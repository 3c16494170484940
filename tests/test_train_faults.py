"""Faults in `megabatch train`, each bounded in time and leaving no process behind:

* kill: under `torchrun --max-restarts 1` (2 ranks), a rank SIGKILLed after step 6 is restarted,
  the run resumes from its checkpoint at step 4 (>= 6 - ckpt_every; not from 0), and ends with the
  same final loss and evaluation as an uninterrupted run (same seed and world) -- for rank 0 (which
  writes the checkpoints) and rank 1;
* NaN: a NaN gradient on one of 2 ranks skips that update on both (their weights stay identical),
  the schedule moves on, metrics.jsonl counts it; N in a row stop the run with step, loss, scale;
* checkpoints: loaded with weights_only=True (a pickle that would run code is refused, the code does
  not run); a truncated newest is skipped with a warning and the previous one used; stale temp
  files are deleted; --keep-checkpoints keeps that many; a run directory holding checkpoints of
  other settings is a usage error (exit 2), --fresh starts over;
* hung rank: a rank that stops calling the loss makes the other fail within --dist-timeout with
  a message naming the collective, and that rank exits within 30 s of its error while the hung
  one still runs (it waits for no peer in teardown);
* preemption: SIGTERM to a single process, to torchrun's agent, or to one of 2 ranks stops every
  rank at one step with one checkpoint there (exit 143; SIGUSR1: 138); the same command resumes
  and, with 2 ranks, ends equal to an uninterrupted run.
Every command runs under tests/_tracked.py: output read with deadlines, every process of the run
(torchrun's workers run in sessions of their own) found by an environment tag and killed at the end.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from _dist_utils import run_world
from _tracked import Tracked
from megabatch_train import from_preset, train
from megabatch_train.cli import main
from megabatch_train.run import checkpoint
from megabatch_train.run.build import cosine_with_warmup
from megabatch_train.run.faults import parse
from megabatch_train.run.step import NonFiniteError

TINY = ["--preset", "tiny", "--log-every", "1", "--no-progress"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_ends_like(run: Path, uninterrupted: Path) -> None:
    """`run` logged steps 1..10 and ended with the uninterrupted run's final loss and evaluation."""
    got, want = records(run), records(uninterrupted)
    assert [r["step"] for r in got] == list(range(1, 11))
    assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-6, abs=0)
    evaluation = json.loads((run / "eval.json").read_text())
    reference = json.loads((uninterrupted / "eval.json").read_text())
    for key in ("zero_shot_top1", "i2t_r1", "t2i_r1", "i2t_r5"):
        assert evaluation[key] == reference[key], key


def torchrun_cmd(args: list[str], restarts: int = 0, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), *flags, "-m", "megabatch_train", *args]


def env_with(fault: str = "") -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MEGABATCH_FAULT": fault}


def finish(run: Tracked, timeout: float, what: str = "torchrun") -> int:
    """`run`'s exit code once it ended within `timeout` s and no process of it is left 10 s later
    (else the test fails with the output; the `with` block then kills what is left)."""
    rc = run.wait(timeout)
    if rc is None:
        pytest.fail(f"{what} did not finish within {timeout} s:\n{run.output[-3000:]}")
    left = run.wait_gone(10)
    if left:
        pytest.fail(f"{len(left)} process(es) outlived {what}: {[p.pid for p in left]}\n{run.output[-3000:]}")
    return rc


def torchrun(args: list[str], fault: str = "", restarts: int = 0, timeout: float = 120) -> tuple[int, str, float]:
    """Run `torchrun --standalone --nproc_per_node 2 -m megabatch_train ARGS`; return (exit code,
    output, seconds). Fails if it runs past `timeout` or any process of it outlives it."""
    with Tracked(torchrun_cmd(args, restarts), env_with(fault)) as run:
        rc = finish(run, timeout)
        seconds = time.monotonic() - run.started
    return rc, run.output, seconds


def wait_for_step(run: Tracked, out: Path, step: int, timeout: float = 120) -> None:
    """Wait until rank 0 has logged `step` in metrics.jsonl (fail with the output at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                 if line.strip()):
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} was not logged within {timeout} s (exit code {run.proc.poll()}):\n{run.output[-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    rc, log, _ = torchrun([*TINY, "--steps", "10", "--ckpt-every", "4", "--output", str(out)])
    assert rc == 0, log[-3000:]
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_killed_rank_restarts_and_resumes(tmp_path, uninterrupted, rank):
    rc, log, _ = torchrun([*TINY, "--steps", "10", "--ckpt-every", "4", "--output", str(tmp_path)],
                          fault=f"kill@6:{rank}", restarts=1)
    assert rc == 0, log[-3000:]
    assert "Connection refused" not in log
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and "step_000004.pt (step 4)" in resumed[0] and "attempt 1" in resumed[0], log[-3000:]
    assert_ends_like(tmp_path, uninterrupted)


def test_hung_rank_fails_within_the_timeout(tmp_path):
    """The rank that times out names the collective and exits within 30 s of its error while its
    peer is still hung: it waits for no peer in teardown (before the fix it could deadlock there for
    good, teardown.py). Then the test ends the run: torchrun would SIGKILL the hung rank only 30 s
    later (it ignores SIGTERM, the preemption handler)."""
    args = [*TINY, "--steps", "6", "--dist-timeout", "3", "--output", str(tmp_path)]
    with Tracked(torchrun_cmd(args), env_with("hang@3:1")) as run:
        rank0, rank1 = run.process_of_rank(0, 120), run.process_of_rank(1, 120)
        assert rank0 is not None and rank1 is not None, run.output[-3000:]
        error = run.wait_for_line(r"error: step 3: the clip loss \(strategy auto: the cost model's pick at the first step\)", 120)
        assert error is not None, run.output[-3000:]
        try:
            rank0.wait(30)
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 still runs 30 s after its error:\n{run.output[-3000:]}")
        assert rank1.is_running(), "the hung rank ended first: this run does not test rank 0's own exit"
    assert "--dist-timeout 3 s" in run.output


def _nan_worker(rank: int, world: int, out: str) -> list[torch.Tensor]:
    os.environ["MEGABATCH_FAULT"] = "nan@3:1"
    cfg = from_preset("tiny", steps=5, log_every=1, output=out, progress=False, strategy="gather")
    model_box = {}

    import megabatch_train.run.build as build

    original = build.ContrastiveModel

    def keep(*a, **k):
        model_box["m"] = original(*a, **k)
        return model_box["m"]

    build.ContrastiveModel = keep
    train(cfg)
    return [p.detach().clone() for p in model_box["m"].parameters()]


def test_nan_on_one_rank_is_skipped_on_every_rank(tmp_path):
    weights = run_world(_nan_worker, 2, tmp_path / "world", str(tmp_path / "run"), timeout=120)
    for a, b in zip(*weights):
        assert torch.equal(a, b)
    recs = records(tmp_path / "run")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    factor = cosine_with_warmup(3, 5)  # the tiny preset's warmup; the schedule moved on at step 3
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 * factor(k) for k in range(1, 6)])


def test_nan_in_a_row_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGABATCH_FAULT", "nan@2-9")
    cfg = from_preset("tiny", steps=9, log_every=1, output=str(tmp_path), progress=False, max_bad_steps=3)
    with pytest.warns(UserWarning, match="update skipped on every rank"), \
            pytest.raises(NonFiniteError, match=r"stopping at step 4: 3 non-finite steps in a row .*logit scale"):
        train(cfg)


def test_fault_spec_errors():
    assert parse("kill@6:1,nan@2-4") == [parse("kill@6:1")[0], parse("nan@2-4")[0]]
    assert [f.kind for f in parse("term@3:1,usr1@2,slow@1-10")] == ["term", "usr1", "slow"]
    for bad in ("boom@3", "nan@x", "nan@0", "nan@5-2", "hang"):
        with pytest.raises(ValueError, match="MEGABATCH_FAULT"):
            parse(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARK']}",))


def test_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    path = tmp_path / "step_000001.pt"
    torch.save({"step": 1, "config": {}, "x": _Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded safely"):
        checkpoint.read(path)
    assert not mark.exists()


def test_corrupt_newest_is_skipped_and_temps_cleaned(tmp_path):
    flags = ["--steps", "6", "--ckpt-every", "2", "--keep-checkpoints", "3", "--output", str(tmp_path)]
    assert main([*TINY, *flags]) == 0
    folder = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step_000002.pt", "step_000004.pt", "step_000006.pt"]
    want = records(tmp_path)[-1]["loss"]
    payload = checkpoint.read(folder / "step_000004.pt")
    assert isinstance(payload["rng"][0]["numpy"][1], torch.Tensor)  # no numpy object in the pickle
    newest = folder / "step_000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a crash
    (folder / ".step_000008.pt.123.tmp").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000006.pt"):
        assert main([*TINY, *flags]) == 0
    assert not list(folder.glob(".*.tmp"))
    assert records(tmp_path)[-1]["loss"] == want  # resumed at 4, same steps 5 and 6


def test_other_settings_are_refused_and_fresh_starts_over(tmp_path, capsys):
    flags = ["--steps", "2", "--ckpt-every", "1", "--output", str(tmp_path)]
    assert main([*TINY, *flags]) == 0
    assert main([*TINY, *flags, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of another run" in err and "--lr (saved 0.001, now 0.01)" in err
    assert main([*TINY, *flags, "--lr", "0.01", "--fresh"]) == 0
    assert "--fresh: deleted 2 checkpoint(s)" in capsys.readouterr().out
    assert checkpoint.read(checkpoint.checkpoint_path(tmp_path, 2))["config"]["lr"] == 0.01
    with pytest.raises(SystemExit):
        main([*TINY, *flags, "--fresh", "--resume", str(tmp_path)])


PREEMPTED = (r"preempted by (SIG\w+) at step (\d+): checkpoint (\S+) written \([\d.]+ s\); "
             r"run the same command to resume")


def _preempted(log: str, signame: str) -> int:
    """The step rank 0 says the run stopped at for `signame` (the message appears exactly once)."""
    found = re.findall(PREEMPTED, log)
    assert len(found) == 1 and found[0][0] == signame, log[-3000:]
    return int(found[0][1])


def _pairs_table(folder: Path, n: int) -> Path:
    """n 8x8 PNGs and a table of (filepath, title): file data, read by DataLoader worker processes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png\tpicture number {i}")
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.tsv"


def test_sigterm_stops_a_single_process_run_with_a_checkpoint(tmp_path):
    """`kill -TERM -PGID` of `python -m megabatch_train` reading files with 2 loader workers (the
    signal reaches them too): exit 143 after a checkpoint at the step it stopped at, every step up
    to it logged, no process left; the same command resumes there and finishes."""
    table = _pairs_table(tmp_path / "data", 80)
    # --context-length 8: with the fitted default (0) a same-command resume of file data is refused
    # today ("model.context_length (saved 5, now 0)"), a resume issue outside this test's subject
    args = [*TINY, "--data", f"csv:{table}", "--workers", "2", "--eval-split", "8", "--batch-size", "24",
            "--micro-batch-size", "12", "--context-length", "8", "--steps", "10", "--output", str(tmp_path / "run")]
    with Tracked([sys.executable, "-m", "megabatch_train", *args], env_with("slow@1-10")) as run:
        wait_for_step(run, tmp_path / "run", 2)
        os.killpg(run.proc.pid, signal.SIGTERM)  # its own session: the trainer and its loader workers
        rc = finish(run, 60, "the run")
    assert rc == 143, run.output[-3000:]
    step = _preempted(run.output, "SIGTERM")
    assert 2 <= step < 10
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")] == [f"step_{step:06d}.pt"]
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, step + 1))
    assert main(args) == 0
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 11))


def test_usr1_fault_stops_at_its_step_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """MEGABATCH_FAULT=usr1@3: SIGUSR1 during step 3 stops the run after step 3 (exit 138, one
    checkpoint); the previous handlers are back afterwards; resuming ends where an uninterrupted
    run ends. (The test's own SIGUSR1 handler catches the signal if train() does not.)"""
    caught: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    try:
        guard = signal.getsignal(signal.SIGUSR1)
        args = [*TINY, "--steps", "5", "--output", str(tmp_path / "run")]
        monkeypatch.setenv("MEGABATCH_FAULT", "usr1@3")
        assert main(args) == 138
        assert not caught and signal.getsignal(signal.SIGUSR1) is guard
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _preempted(capsys.readouterr().out, "SIGUSR1") == 3
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000003.pt"]
    monkeypatch.delenv("MEGABATCH_FAULT")
    assert main(args) == 0
    assert main([*TINY, "--steps", "5", "--output", str(tmp_path / "reference")]) == 0
    got, want = records(tmp_path / "run"), records(tmp_path / "reference")
    assert [r["step"] for r in got] == list(range(1, 6))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint(tmp_path):
    """SIGTERM to torchrun's agent: it forwards it, both ranks stop at one step and exit before
    torchrun's --shutdown-timeout (none is SIGKILLed), rank 0 wrote that step's checkpoint; torchrun
    itself ends with SignalException (exit 1). (SIGUSR1 with --signals-to-handle SIGTERM,SIGUSR1 is
    forwarded the same way: checked by hand, docs/operations.md.)"""
    args = [*TINY, "--steps", "10", "--output", str(tmp_path)]
    with Tracked(torchrun_cmd(args), env_with("slow@1-10")) as run:
        wait_for_step(run, tmp_path, 1)
        os.kill(run.proc.pid, signal.SIGTERM)
        rc = finish(run, 60)
    assert rc == 1 and "SignalException" in run.output, run.output[-3000:]
    assert "forcefully exiting via" not in run.output  # no rank needed SIGKILL
    step = _preempted(run.output, "SIGTERM")
    assert 1 <= step < 10
    assert checkpoint.checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{step:06d}.pt"
    assert [r["step"] for r in records(tmp_path)] == list(range(1, step + 1))


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes(tmp_path, uninterrupted):
    """SIGTERM to rank 1 only: rank 0 learns it through the step's all_reduce, both stop after the
    same step and exit 143; the same command resumes and ends equal to an uninterrupted run."""
    args = [*TINY, "--steps", "10", "--ckpt-every", "4", "--output", str(tmp_path)]
    with Tracked(torchrun_cmd(args), env_with("slow@1-10")) as run:
        rank1 = run.process_of_rank(1, 120)
        assert rank1 is not None, run.output[-3000:]
        wait_for_step(run, tmp_path, 1)
        rank1.send_signal(signal.SIGTERM)
        rc = finish(run, 60)
    assert rc == 1, run.output[-3000:]
    assert sorted(re.findall(r"exitcode\s+: (-?\d+) \(pid", run.output)) == ["143", "143"], run.output[-3000:]
    step = _preempted(run.output, "SIGTERM")
    assert checkpoint.checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{step:06d}.pt"
    rc, log, _ = torchrun(args)
    assert rc == 0, log[-3000:]
    assert f"step_{step:06d}.pt (step {step})" in log
    assert_ends_like(tmp_path, uninterrupted)
