"""Resuming `megabatch train` on users' files, and its run directory (docs/operations.md: Resuming, Outputs).

Contract checked here:
- A run on csv/wds data killed mid-way (a real SIGKILL: MEGABATCH_FAULT=kill@K in a subprocess; an
  exception in-process), run again with the same command, resumes from its newest checkpoint and
  ends with the uninterrupted run's loss and evaluation; so does a torchrun --max-restarts 1
  restart (2 ranks). The context length the tokenizer fits to the captions is restored from the
  checkpoint, not compared as if the user had changed it; checkpoints from before the given
  config was saved resume too.
- A finished run run again exits 0, says it is complete and where its eval.json is, and trains
  nothing (no file of the run changes).
- Settings that really differ: exit 2 naming the flags, offering --output NEW_DIR first and saying
  how many checkpoints --fresh deletes. A data table or shard set that changed since the checkpoint
  is a warning naming it.
- --output is proven writable before any work (a file, a path under /proc, one under a file, a
  folder where the probe cannot be written, a checkpoints "folder" that is a file): one line
  `megabatch train: error: --output ...: <why>`, exit 2, before the data is read; on 2 ranks every
  rank gets the error, none hangs. A checkpoint save that fails later is reported with the path and
  the OSError, training goes on, the next save writes again, and the summary names the newest
  checkpoint written; a plotting error is a warning.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from _dist_utils import run_world
from test_train_faults import torchrun
from test_train_userdata import make_table, shard
from megabatch_train import from_preset
from megabatch_train.cli import main
from megabatch_train.config.flags import parse_args
from megabatch_train.evaluation import outputs, plots
from megabatch_train.evaluation.report import MetricsLog
from megabatch_train.run import checkpoint, identity, loop

SRC = str(Path(__file__).resolve().parents[1] / "src")
CSV = ["--preset", "tiny", "--data", "csv:pairs.tsv", "--csv-img-key", "path", "--csv-caption-key", "caption",
       "--eval-split", "8", "--workers", "0", "--batch-size", "16", "--micro-batch-size", "16", "--steps", "8",
       "--ckpt-every", "2", "--log-every", "1", "--no-progress"]
WDS = ["--preset", "tiny", "--data", "wds:shards/s-{0..1}.tar", "--eval-split", "0.2", "--workers", "0",
       "--batch-size", "16", "--micro-batch-size", "16", "--steps", "6", "--ckpt-every", "2", "--log-every", "1",
       "--no-progress"]
EVAL_KEYS = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")


class _Crash(Exception):
    """Stands in for a kill inside the test process."""


class _At:
    """A stand-in for loop.Injector that calls fn(step) after each step's update (where kill@K fires)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, rank):
        return self

    def before_loss(self, step):
        pass

    def after_backward(self, step, model):
        pass

    def after_update(self, step):
        self.fn(step)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_result(run: Path, reference: Path) -> None:
    got, want = records(run), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    evaluation, ref = (json.loads((p / "eval.json").read_text()) for p in (run, reference))
    assert {k: evaluation[k] for k in EVAL_KEYS} == {k: ref[k] for k in EVAL_KEYS}


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with pairs.tsv (40 rows) and shards/s-0.tar, s-1.tar (40 samples each)."""
    folder = tmp_path_factory.mktemp("data")
    make_table(folder, 40)
    (folder / "shards").mkdir()
    for s in range(2):
        shard(folder / "shards" / f"s-{s}.tar", range(40 * s, 40 * s + 40), with_id=False)
    return folder


@pytest.fixture(scope="module")
def reference(data) -> Path:
    """The uninterrupted csv run (relative paths, from the data folder, as a user would type them)."""
    here = os.getcwd()
    os.chdir(data)
    try:
        assert main([*CSV, "--output", "reference"]) == 0
    finally:
        os.chdir(here)
    return data / "reference"


def test_csv_killed_run_rerun_resumes_like_uninterrupted(data, reference, monkeypatch, capsys):
    """Finding: the rerun exited 2 ("model.context_length (saved 5, now 0)"), advising --fresh."""
    monkeypatch.chdir(data)
    args = [*CSV, "--output", "killed"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MEGABATCH_FAULT": "kill@5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megabatch_train", *args], env=env, cwd=data,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    assert [p.name for p in checkpoint.checkpoints(data / "killed" / "checkpoints")] == \
        ["step_000002.pt", "step_000004.pt"]
    code, out, err = cli(args, capsys)  # the same command again
    assert code == 0, err
    assert "resuming from killed/checkpoints/step_000004.pt (step 4)" in out
    same_result(data / "killed", reference)


def test_wds_crashed_run_rerun_resumes_like_uninterrupted(data, monkeypatch, capsys):
    monkeypatch.chdir(data)
    assert main([*WDS, "--output", "wds-reference"]) == 0

    def crash(step):
        if step == 3:
            raise _Crash

    monkeypatch.setattr(loop, "Injector", _At(crash))
    with pytest.raises(_Crash):
        main([*WDS, "--output", "wds-crashed"])
    monkeypatch.undo()
    monkeypatch.chdir(data)
    capsys.readouterr()
    code, out, err = cli([*WDS, "--output", "wds-crashed"], capsys)
    assert code == 0, err
    assert "resuming from wds-crashed/checkpoints/step_000002.pt (step 2)" in out
    same_result(data / "wds-crashed", data / "wds-reference")


def test_finished_run_rerun_is_complete_and_trains_nothing(data, reference, monkeypatch, capsys):
    monkeypatch.chdir(data)
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    code, out, err = cli([*CSV, "--output", "reference"], capsys)
    assert code == 0, err
    assert "reference is complete: its checkpoint step_000008.pt is at step 8, at --steps 8; nothing to train" in out
    assert "held-out eval at step 8 in reference/eval.json" in out
    assert "resuming" not in out and "held-out eval at step 8:" not in out  # no summary of a new run
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before  # nothing written


def _two_ranks(rank: int, world: int, folder: str, args: list[str], bad: str) -> str:
    """The uninterrupted 2-rank run of `args` (from `folder`), after a run with the unusable --output `bad`."""
    os.chdir(folder)
    try:
        loop.train(from_preset("tiny", output=bad, progress=False))
        said = "trained"
    except outputs.OutputError as e:  # on every rank, no collective left waiting
        said = str(e)
    loop.train(parse_args(args)[0])
    return said


def test_torchrun_restart_on_csv_resumes_like_uninterrupted(data, tmp_path, monkeypatch):
    """Finding: under torchrun --max-restarts 1 the restarted worker exited 2 and the run died.
    The reference runs in 2 spawned ranks (gloo, as torchrun's), which first meet an --output that
    is a file: an OutputError on both, no hang."""
    monkeypatch.chdir(data)  # torchrun's workers inherit the working directory (csv:pairs.tsv)
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [*CSV, "--micro-batch-size", "8", "--steps", "6"]
    (tmp_path / "file").write_text("x")
    said = run_world(_two_ranks, 2, tmp_path / "world", str(data), [*args, "--output", str(tmp_path / "two")],
                     str(tmp_path / "file"), timeout=180)
    assert said == [f"--output {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder"] * 2
    rc, log, _ = torchrun([*args, "--output", str(tmp_path / "restarted")], fault="kill@3:1", restarts=1,
                          timeout=180)
    assert rc == 0, log[-3000:]
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and "step_000002.pt (step 2)" in resumed[0] and "attempt 1" in resumed[0], log[-3000:]
    same_result(tmp_path / "restarted", tmp_path / "two")


def test_other_settings_are_named_and_another_output_offered(data, reference, monkeypatch, capsys):
    monkeypatch.chdir(data)
    fitted = json.loads((reference / "config.json").read_text())["model"]["context_length"]
    assert fitted >= 4 and json.loads((reference / "config.json").read_text())["data"] == "csv:pairs.tsv"
    code, out, err = cli([*CSV, "--output", "reference", "--context-length", str(fitted)], capsys)
    assert code == 0 and "is complete" in out, err  # the fitted value, given: the same run
    code, out, err = cli([*CSV, "--output", "reference", "--lr", "0.01", "--context-length", str(fitted + 3)], capsys)
    assert code == 2
    assert "reference holds checkpoints of another run (step_000008.pt, step 8)" in err
    assert f"--lr (saved 0.001, now 0.01), --context-length (saved 0, now {fitted + 3})" in err
    assert err.index("--output NEW_DIR") < err.index("--fresh deletes its 2 checkpoint(s)")
    assert "Traceback" not in err and err.strip().splitlines()[1:] == ["see `megabatch train --help` for the options"]


def test_old_checkpoint_without_given_config_resumes(data, reference, monkeypatch, capsys):
    """A checkpoint from before "given_config": its fitted context length is not compared."""
    monkeypatch.chdir(data)
    payload = checkpoint.read(reference / "checkpoints" / "step_000008.pt")
    old = {k: v for k, v in payload.items() if k not in ("given_config", "data_files")}
    old["step"], old["evals"] = 4, []  # (the step and history a checkpoint at 4 would hold; weights as at 8)
    folder = data / "old" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(old, folder / "step_000004.pt")
    code, out, err = cli([*CSV, "--output", "old", "--steps", "5"], capsys)
    assert code == 0, err
    assert "resuming from old/checkpoints/step_000004.pt (step 4)" in out
    assert [r["step"] for r in records(data / "old")] == [5]
    assert checkpoint.read(folder / "step_000005.pt")["given_config"]["model"]["context_length"] == 0


def test_changed_data_is_warned(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_table(tmp_path, 40)
    shutil.copytree(data / "shards", tmp_path / "shards")
    args = [*CSV, "--output", "run", "--steps", "2"]
    assert main(args) == 0
    table = tmp_path / "pairs.tsv"
    table.write_text(table.read_text().replace("number 7\t", "number 8\t"))  # same rows, another caption
    with pytest.warns(UserWarning, match=r"resuming step_000002.pt on data that changed since it was saved: "
                                         r"--data csv:pairs.tsv: the table changed \(.* bytes, other content"):
        assert main([*CSV, "--output", "run", "--steps", "3"]) == 0
    os.utime(table)  # touched only: the same rows, no warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*CSV, "--output", "run", "--steps", "4"]) == 0
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4]
    assert not [str(w.message) for w in seen if "changed since" in str(w.message)]

    cfg = from_preset("tiny", data="wds:shards/*.tar")
    before = identity.data_files(cfg)
    shard(tmp_path / "shards" / "s-2.tar", range(80, 90), with_id=False)
    shard(tmp_path / "shards" / "s-0.tar", range(0, 30), with_id=False)
    changes = identity.data_changes(before, identity.data_files(cfg))
    assert len(changes) == 1 and changes[0].startswith("--data wds:shards/*.tar: 1 shard(s) added (s-2.tar); "
                                                       "s-0.tar changed (")


def test_unusable_output_is_one_usage_line_before_any_work(tmp_path, monkeypatch, capsys):
    """Finding: a file, /proc or read-only --output was a traceback; a checkpoints folder that cannot
    be written was found at the first save, or at the end, after the training."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "run" / "checkpoints").parent.mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    missing = ["--data", f"csv:{tmp_path / 'missing.tsv'}"]  # read after the check: never reported
    cases = [
        (tmp_path / "file", f"{tmp_path / 'file'} is a file, not a folder"),
        (tmp_path / "file" / "run", f"cannot create {tmp_path / 'file' / 'run'}: Not a directory"),
        (Path("/proc/megabatch-run"), "cannot create /proc/megabatch-run: "),
        (tmp_path / "run", f"{tmp_path / 'run' / 'checkpoints'} is a file, not a folder"),
    ]
    for output, why in cases:
        code, out, err = cli([*CSV, *missing, "--output", str(output)], capsys)
        assert code == 2 and err.startswith(f"megabatch train: error: --output {output}: {why}"), (output, err)
        assert len(err.strip().splitlines()) == 2 and "missing.tsv" not in err, (output, err)

    def read_only(path, *a, **k):  # root ignores permissions: a folder that refuses files, as EACCES would
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(outputs, "open", read_only, raising=False)
    code, out, err = cli([*CSV, *missing, "--output", str(tmp_path / "ro")], capsys)
    assert code == 2 and err.strip().splitlines()[0] == f"megabatch train: error: --output {tmp_path / 'ro'}: " \
                                                       f"cannot write in {tmp_path / 'ro'}: Permission denied", err


def test_failed_saves_keep_the_run_going(data, reference, monkeypatch, capsys):
    """The save at step 4 fails (the checkpoints folder moved away, a file in its place), 6 succeeds
    (the folder is back), 8 fails (disk full); curves.png cannot be drawn. The run trains to the end
    with the uninterrupted run's results and says which checkpoint is the newest written."""
    monkeypatch.chdir(data)
    folder = data / "saves" / "checkpoints"
    real_save = torch.save

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    def disk(step):
        if step == 3:
            folder.rename(folder.with_name("moved"))
            folder.write_text("not a folder")
        if step == 5:
            folder.unlink()
            folder.with_name("moved").rename(folder)
        if step == 7:
            monkeypatch.setattr(torch, "save", full)

    def no_plot(*a, **k):
        raise RuntimeError("no display, no Agg")

    monkeypatch.setattr(loop, "Injector", _At(disk))
    monkeypatch.setattr(plots, "_draw", no_plot)
    with pytest.warns(UserWarning, match="curves.png was not drawn: RuntimeError: no display"):
        code, out, err = cli([*CSV, "--output", "saves"], capsys)
    assert code == 0, err
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 0, err
    assert "step 4's checkpoint could not be written to saves/checkpoints/step_000004.pt: [Errno 17] File exists" \
           in err and "Newest checkpoint written: saves/checkpoints/step_000002.pt (step 2)" in err, err
    assert "checkpoint saves/checkpoints/step_000006.pt written (the save of step 4 had failed)" in err
    assert "step 8's checkpoint could not be written to saves/checkpoints/step_000008.pt: [Errno 28] No space " \
           "left on device. Training goes on" in err
    assert "newest checkpoint: saves/checkpoints/step_000006.pt (step 6); NOT SAVED: step 8's weights could not " \
           "be written to saves/checkpoints/step_000008.pt: [Errno 28] No space left on device" in out
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step_000002.pt", "step_000006.pt"]
    assert not list(folder.glob(".*.tmp"))
    same_result(data / "saves", reference)
    assert not (data / "saves" / "curves.png").exists()


def test_metrics_log_survives_a_failed_write(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.append({"step": 1})
    shutil.rmtree(tmp_path / "run")  # the folder gone: the append fails
    with pytest.warns(UserWarning, match=r"step 2's metrics could not be written \(\[Errno 2\]"):
        log.append({"step": 2})
    (tmp_path / "run").mkdir()
    log.append({"step": 3})
    assert records(tmp_path / "run") == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_fitted_fields_are_not_compared():
    """A Hugging Face model's image size and context, and a csv context fitted to the captions: the
    given value is compared (the fitted one is also accepted); an old checkpoint's are not compared."""
    given = from_preset("tiny", source="hf:clip.json", tokenizer="app", context_length=16)
    ran = from_preset("tiny", source="hf:clip.json", tokenizer="app", context_length=12, image_size=24)
    new = {"step": 2, "config": ran.to_dict(), "given_config": given.to_dict()}
    old = {"step": 2, "config": ran.to_dict()}
    for payload in (new, old):
        assert identity.differences(payload, given) == []
        assert identity.differences(payload, ran) == []
    other = from_preset("tiny", source="hf:clip.json", tokenizer="app", context_length=20, lr=0.01)
    assert identity.differences(new, other) == ["--lr (saved 0.001, now 0.01)",
                                                  "--context-length (saved 16, now 20)"]
    assert identity.differences(old, other) == ["--lr (saved 0.001, now 0.01)"]  # fitted: not compared
    csv = from_preset("tiny", data="csv:t.tsv")
    fitted = from_preset("tiny", data="csv:t.tsv", context_length=9)
    assert identity.differences({"config": fitted.to_dict()}, csv) == []
    assert identity.differences({"config": fitted.to_dict()}, from_preset("tiny", data="csv:t.tsv",
                                                                           image_size=16)) == \
        ["--image-size (saved 32, now 16)"]
