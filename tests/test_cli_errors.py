"""The command lines' edges (issue 26, finding 5), each as the user meets it.

Contract checked here:
- `megabatch bench --device` is checked before any work: an unknown device type lists the valid ones; cuda
  on a CPU build of torch says so, cuda without a visible GPU says so; a usage error (exit 2, no traceback).
- `megabatch bench --peers` names each peer it does not run and why (not installed: the pip command; CUDA
  only; not the loss asked for), on stdout and in the JSON.
- `megabatch plan`: hardware and dtype names in any case; a time-model flag without --time is a usage error
  naming the flag; the table's `<-` is explained in its legend.
- `megabatch train`: a --batch-size below the preset's micro-batch takes the micro-batch down to it, and
  says so, unless --micro-batch-size is given (then it is an error); --help gives each flag's default with
  the presets' values; `megabatch --version` prints the version.
- A warning of a command shows as `megabatch CMD: warning: MESSAGE`, not the library's source line.
- A reader that goes away (`... | head -1`) ends every command quietly: exit status 141, nothing on stderr
  (one real process, a pipe whose reading end is closed before anything is written).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import megabatch
from megabatch import cli
from megabatch.bench import peers, single

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def usage_error(argv: list[str], capsys) -> str:
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    return err.splitlines()[0]


def test_bench_device_is_checked_first(capsys, monkeypatch):
    line = usage_error(["bench", "--device", "tpu"], capsys)
    assert line == "megabatch bench: error: --device must be one of cpu, cuda, cuda:N; got 'tpu'"
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    line = usage_error(["bench", "--device", "cuda"], capsys)
    assert line.startswith("megabatch bench: error: --device cuda: this torch has no CUDA (CPU build, torch ")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = usage_error(["bench", "--device", "CUDA:1"], capsys)
    assert line.startswith("megabatch bench: error: --device cuda:1: no GPU visible")


def test_bench_peers_names_the_skipped_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peers, "_installed", lambda peer: peer in ("plain", "memeff"))
    monkeypatch.setattr(single, "gemm_tflops", lambda *a: 1.0)  # no case runs: only the notes are asked for
    monkeypatch.setattr(single, "measure_isolated", lambda case: single.Result(case, error="not run"))
    out = tmp_path / "r.json"
    code, printed, err = run(["bench", "--peers", "--device", "cpu", "--loss", "siglip", "--batch", "8", "--dim",
                              "4", "--json", str(out)], capsys)
    assert code == 0, err
    notes = [line for line in printed.splitlines() if "skipped:" in line]
    assert notes == ["megabatch bench: peer open_clip skipped: not installed (pip install open-clip-torch)",
                     "megabatch bench: peer inf_cl skipped: not installed (pip install inf-cl)",
                     "megabatch bench: peer memeff skipped: runs on CUDA only (--device cpu)",
                     "megabatch bench: peer siglip_kernel skipped: not installed (pip install siglip-kernel)"]
    assert json.loads(out.read_text())["peers_skipped"]["inf_cl"] == "not installed (pip install inf-cl)"
    monkeypatch.setattr(peers, "_installed", lambda peer: True)
    assert peers.skipped("cpu", ("clip",))["siglip_kernel"] == "runs on CUDA only (--device cpu)"
    monkeypatch.setattr(peers, "available", lambda device: list(peers.PEERS))
    assert peers.skipped("cuda", ("siglip",)) == {"inf_cl": "implements clip only (--loss siglip)",
                                                  "memeff": "implements clip only (--loss siglip)"}


def test_plan_names_in_any_case_time_flags_need_time_and_the_marker_is_explained(capsys):
    args = ["plan", "--batch", "96", "--dim", "64"]
    code, out, err = run([*args, "--time", "--gpu", "h200", "--dtype", "Float32", "--device", "CPU"], capsys)
    assert code == 0, err
    assert "float32 on cpu; time on H200 (predicted)" in out and " <-" in out
    assert "<-: the option planned: --strategy and --backend as given, auto as the losses pick it" in out
    assert "auto picks local: one rank: nothing to exchange" in out
    for flag, value in (("--gemm-tflops", "500"), ("--gpu", "A100"), ("--latency", "2")):
        line = usage_error([*args, flag, value], capsys)
        assert line == f"megabatch plan: error: {flag} sets the time model: it needs --time"
    assert run([*args, "--ranks-per-node", "4"], capsys)[0] == 0  # it also places hierarchical's nodes


def test_micro_batch_follows_a_smaller_batch_unless_given(capsys, monkeypatch):
    from megabatch_train.config.flags import parse_args

    monkeypatch.delenv("RANK", raising=False)
    cfg, given = parse_args(["--preset", "tiny", "--batch-size", "16"])
    assert (cfg.batch_size, cfg.micro_batch_size) == (16, 16) and given == {"batch_size": 16}
    said = capsys.readouterr().out
    assert said == "megabatch train: --micro-batch-size 16 (the preset's 32 exceeds --batch-size 16)\n"
    cfg, _ = parse_args(["--preset", "tiny", "--batch-size", "48"])  # the preset's 32 fits: kept, nothing said
    assert cfg.micro_batch_size == 32 and capsys.readouterr().out == ""
    line = usage_error(["train", "--preset", "tiny", "--batch-size", "16", "--micro-batch-size", "32"], capsys)
    assert line == "megabatch train: error: --micro-batch-size (32) must not exceed --batch-size (16)"


def test_train_help_gives_defaults_and_version_exists(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    assert "(default: 256 with --preset small; tiny: 32, demo: 512, base: 512)" in out  # --micro-batch-size
    assert "(default: runs/train with --preset small; demo: runs/demo)" in out  # --output
    assert "ViT patch side in pixels (default: 8)" in out
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out == f"megabatch {version('megabatch')}\n"

    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", not_installed)
    assert run(["--version"], capsys)[1] == f"megabatch {megabatch.__version__}\n"


def _table(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png\tpicture number {i}")
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.tsv"


def test_a_warning_shows_its_message_not_the_source_line(tmp_path, capsys, monkeypatch):
    # pytest records warnings; this puts back a display as the default one writes (warnings.formatwarning to
    # stderr), through the public hook, so what the command's formatter makes of it is seen.
    def display(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    from megabatch_train.run import loop

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(loop, "plot_curves", lambda *a, **k: False)  # drawing is most of the run's time
    table = _table(tmp_path, 5)
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = display
        code, out, err = run(["train", "--preset", "tiny", "--steps", "1", "--batch-size", "16", "--micro-batch-size",
                              "16", "--no-progress", "--data", f"csv:{table}", "--eval-split", "0", "--output",
                              str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert warnings.formatwarning is before  # the process's warning state is put back
    said = [line for line in err.splitlines() if "distinct pairs" in line]
    assert len(said) == 1 and said[0].startswith("megabatch train: warning: "), err
    assert "pairs.tsv: the training data holds 5 distinct pairs, fewer than the global batch 16" in said[0]
    assert "UserWarning" not in err and ".py:" not in err and "warnings.warn(" not in err


# Each command, its stdout a pipe whose reader has gone: (argv, what the command would print).
PIPED = [["plan", "--batch", "96", "--dim", "64"], ["plan", "--batch", "96", "--dim", "64", "--json"],
         ["bench", "--help"], ["train", "--help"], ["study", "--help"], ["--version"], ["--help"]]
_SCRIPT = """
import json, os, sys
from megabatch import cli
codes = []
for argv in json.loads(sys.argv[1]):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    os.dup2(write, 1)
    os.close(write)
    try:
        codes.append(cli.main(argv))
    except SystemExit as e:
        codes.append(e.code)
with open(sys.argv[2], "w") as f:
    json.dump(codes, f)
sys.exit(codes[0])
"""


def test_a_reader_that_goes_away_ends_each_command_quietly(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = tmp_path / "codes.json"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(PIPED), str(result)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr == "" and proc.returncode == cli.BROKEN_PIPE, proc.stderr
    assert json.loads(result.read_text()) == [cli.BROKEN_PIPE] * len(PIPED)
