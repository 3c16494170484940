"""The library and the app are two packages: `megabatch` works without `megabatch_train`.

In a subprocess where `megabatch_train` cannot be imported (its entry in sys.modules is None, as
if only the library were installed), a loss computes, `megabatch plan` plans, `megabatch bench
--help` answers, and `megabatch train` / `megabatch study` name the extra that brings them
instead of a traceback. The app's commands reach `megabatch` only through the entry-point group
`megabatch.commands` (pyproject.toml).
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

WITHOUT_APP = r"""
import contextlib, io, json, sys
sys.modules["megabatch_train"] = None  # import megabatch_train -> ImportError, as if not installed
import torch
import megabatch as mb
from megabatch.cli import main

x = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1)
loss = mb.clip_loss(x, x.flip(0), torch.tensor(10.0, dtype=torch.float64))
ref = mb.clip_loss_reference(x, x.flip(0), torch.tensor(10.0, dtype=torch.float64))
out = {"loss": float(loss), "ref": float(ref)}
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
    assert found == {"train": "megabatch_train.cli:main", "study": "megabatch_train.study:main"}
