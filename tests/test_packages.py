"""The library and the app are two packages: `megabatch` works without `megabatch_train`.

In a subprocess where `megabatch_train` cannot be imported (its entry in sys.modules is None, as
if only the library were installed), a loss computes, `megabatch plan` plans, `megabatch bench
--help` answers, and `megabatch train` / `megabatch study` name the extra that brings them
instead of a traceback; `import megabatch` leaves torch._dynamo unloaded (only torch.compile needs it,
and its import costs each process about as much CPU as torch's). The app's commands reach `megabatch` only through the entry-point group
`megabatch.commands` (pyproject.toml).
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

WITHOUT_APP = r"""
import contextlib, io, json, sys
sys.modules["megabatch_train"] = None  # import megabatch_train -> ImportError, as if not installed
import torch
import megabatch as mb
from megabatch.cli import main

dynamo_at_import = "torch._dynamo" in sys.modules  # ~4 s of CPU per process; only torch.compile needs it
x = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1)
loss = mb.clip_loss(x, x.flip(0), torch.tensor(10.0, dtype=torch.float64))
ref = mb.clip_loss_reference(x, x.flip(0), torch.tensor(10.0, dtype=torch.float64))
out = {"loss": float(loss), "ref": float(ref), "dynamo_at_import": dynamo_at_import}
for name, argv in {"plan": ["plan", "--world", "2", "--batch", "64", "--dim", "8", "--json"],
                   "bench": ["bench", "--help"], "train": ["train", "--preset", "tiny"], "study": ["study"],
                   "help": ["--help"]}.items():
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            code = main(argv)
        except SystemExit as s:
            code = s.code
    out[name] = [code, o.getvalue(), e.getvalue()]
out["app_loaded"] = any(m.startswith("megabatch_train") and sys.modules[m] is not None for m in sys.modules)
print(json.dumps(out))
"""


def test_the_library_works_without_the_app() -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_APP], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(out["loss"] - out["ref"]) < 1e-12
    assert not out["dynamo_at_import"], "import megabatch imported torch._dynamo"
    code, stdout, stderr = out["plan"]
    assert code == 0 and json.loads(stdout)["options"], stderr
    code, stdout, _ = out["bench"]
    assert code == 0 and "usage: megabatch bench" in stdout
    for command in ("train", "study"):
        code, stdout, stderr = out[command]
        assert code == 1 and stdout == "", (command, stdout, stderr)
        assert stderr.startswith(f"megabatch {command} needs the [train] extra: pip install 'megabatch[train]'")
        assert "Traceback" not in stderr
    assert out["help"][0] == 0 and "train" in out["help"][1]
    assert not out["app_loaded"]


def test_the_app_registers_its_commands_in_the_librarys_group() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="megabatch.commands")}
    assert found == {"train": "megabatch_train.cli:main", "study": "megabatch_train.studies.study:main"}


def test_a_checkpoint_written_before_the_split_resumes(tmp_path, capsys) -> None:
    """tests/data/before_app_split/step_000002.pt was written by `megabatch.train` (the app inside the
    library, commit 30188d7's layout; tiny preset, widths 16, 2 steps). It names no module of either
    package (checkpoints unpickle with weights_only=True), so the moved app resumes it."""
    from pathlib import Path

    import torch

    from megabatch_train.cli import main

    old = Path(__file__).parent / "data" / "before_app_split" / "step_000002.pt"
    with pytest.warns(RuntimeWarning, match="collapsed"):  # 3 steps of a 16-wide model: expected
        code = main(["--resume", str(old), "--steps", "3", "--output", str(tmp_path), "--no-progress",
                     "--threads", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert f"resuming from {old} (step 2, --resume)" in out.out
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]
    before = torch.load(old, weights_only=True)
    after = torch.load(tmp_path / "checkpoints" / "step_000003.pt", weights_only=True)
    assert after["step"] == 3 and after["model"].keys() == before["model"].keys()
    # one more AdamW step from the saved moments: the weights moved, but by no more than lr-sized steps
    moved = max(float((after["model"][k] - before["model"][k]).abs().max()) for k in before["model"]
                if before["model"][k].is_floating_point())
    assert 0 < moved < 0.05
