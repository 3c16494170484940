"""Finite or refused: what `megabatch train` (and study, bench, plan) accept, and what they report.

- Every float flag must be a finite number in its range: `--lr inf` is a usage error (exit 2) of two
  lines, `megabatch train: error: --lr must be a finite number > 0 (got inf)` and a pointer to --help,
  without argparse's usage block; TrainConfig.validate raises the same ValueError for Python callers.
- evaluate() never scores a NaN or inf similarity: a model whose weights are NaN gets NaN metrics
  (before: R@1 = 1.0, since a NaN similarity fails every comparison and so ranks first) and
  "non_finite" says which embeddings; a run that diverges (--lr 1e30) exits 1 with no perfect metric.
- A metric whose chance level is 50% or more is listed as not meaningful (eval.json and summary).
- `python -m megabatch --help` works; a missing [train] extra is named with its pip command (exit 1,
  no traceback); without matplotlib a run warns, prints its summary and exits 0.
- Every --help of train, study, bench and plan has a whole-sentence description and a help text
  for every option.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megabatch.cli import main as megabatch
from megabatch_train.config.flags import parse_args
from megabatch_train.config.sections import TrainConfig, from_preset
from megabatch_train.data.synthetic import SyntheticShapes
from megabatch_train.data.tokenizer import tokenizer_for
from megabatch_train.data.types import EvalData, ZeroShotTask
from megabatch_train.evaluation.evaluate import evaluate
from megabatch_train.evaluation.report import summary
from megabatch_train.models.towers import ContrastiveModel

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_RUN = ["train", "--preset", "tiny", "--no-progress"]


def _two_line_usage_error(err: str, prog: str) -> str:
    """The first line of a usage error, after checking its shape: two lines, no usage block."""
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{prog}: error: ") and "usage:" not in err, err
    assert lines[1] == f"see `{prog} --help` for the options", err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "inf"], "--lr must be a finite number > 0 (got inf)"),
    (["--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0 (got -0.1)"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0 (got nan)"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0 (got inf)"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0 (got -1.0)"),
    (["--dropout", "nan"], "--dropout must be a finite number in [0, 1) (got nan)"),
    (["--dropout", "1"], "--dropout must be a finite number in [0, 1) (got 1.0)"),
    (["--dist-timeout", "inf"], "--dist-timeout must be a finite number > 0 (got inf)"),
    (["--dist-timeout", "0"], "--dist-timeout must be a finite number > 0 (got 0.0)"),
    (["--logit-bias-init", "nan"], "--logit-bias-init must be a finite number (got nan)"),
    (["--logit-bias-init=-inf"], "--logit-bias-init must be a finite number (got -inf)"),
    (["--eval-split", "nan"], "--eval-split must be a fraction in [0, 1) or a whole number of pairs (got nan)"),
    (["--eval-split", "inf"], "--eval-split must be a fraction in [0, 1) or a whole number of pairs (got inf)"),
    (["--seed", str(2**32)], f"--seed must be an integer in [0, {2**32 - 1}], got {2**32}"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be a positive integer, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be a non-negative integer, got -1"),
])
def test_numbers_are_finite_and_in_range_or_a_usage_error(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "tiny", *argv])
    assert e.value.code == 2
    assert _two_line_usage_error(capsys.readouterr().err, "megabatch train") == f"megabatch train: error: {expected}"


def test_validate_refuses_non_finite_numbers_from_python():
    for field, value in (("lr", math.inf), ("lr", math.nan), ("weight_decay", math.nan), ("dist_timeout", math.inf),
                         ("logit_bias_init", math.nan), ("lr", "0.1")):
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be a finite number"):
            from_preset("tiny", **{field: value})
    with pytest.raises(ValueError, match=r"--dropout must be a finite number in \[0, 1\) \(got nan\)"):
        from_preset("tiny", dropout=math.nan)
    cfg = from_preset("tiny")
    cfg.lr = math.inf  # set after construction: train(cfg) validates again
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig.validate(cfg)


@pytest.mark.parametrize("argv, prog, expected", [
    (["study", "--lr", "nan"], "megabatch study", "--lr must be a finite number > 0 (got nan)"),
    (["study", "--seeds", "-1"], "megabatch study", "--seeds must be an integer in [0, 4294967295], got -1"),
    (["bench", "--max-seconds", "inf"], "megabatch bench", "--max-seconds must be a finite number > 0 (got inf)"),
    (["plan", "--batch", "0", "--dim", "4"], "megabatch plan", "batch must be a positive integer, got 0"),
    (["plan", "--dim", "4"], "megabatch plan", "the following arguments are required: --batch"),
])
def test_other_commands_usage_errors_are_two_lines(argv, prog, expected, capsys):
    with pytest.raises(SystemExit) as e:
        megabatch(argv)
    assert e.value.code == 2
    assert _two_line_usage_error(capsys.readouterr().err, prog) == f"{prog}: error: {expected}"


def test_unknown_command_is_a_two_line_usage_error(capsys):
    assert megabatch(["trian"]) == 2
    first = _two_line_usage_error(capsys.readouterr().err, "megabatch")
    assert "'trian'" in first and "train" in first


@pytest.fixture(scope="module")
def tiny_eval():
    """A tiny preset's model and tokenizer with the synthetic set's held-out data (1,024 images)."""
    cfg = from_preset("tiny")
    stream = SyntheticShapes(image_size=cfg.model.image_size, seed=0)
    tokenizer = tokenizer_for(cfg.model.context_length, stream)
    torch.manual_seed(0)
    return ContrastiveModel(cfg.model, tokenizer.vocab_size, "clip"), tokenizer, stream.eval_set()


def _metric_keys(metrics: dict) -> list[str]:
    keys = list(metrics["chance"])
    assert {"i2t_r1", "t2i_r1", "i2t_r10", "zero_shot_top1"} <= set(keys)
    return keys


def test_a_model_of_nan_weights_scores_nan_not_perfect(tiny_eval):
    model, tokenizer, data = tiny_eval
    cpu = torch.device("cpu")
    fine = evaluate(model, tokenizer, data, cpu)
    assert "non_finite" not in fine and all(math.isfinite(fine[k]) for k in _metric_keys(fine))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(math.nan)
    metrics = evaluate(broken, tokenizer, data, cpu)
    for key in _metric_keys(metrics):
        assert math.isnan(metrics[key]), (key, metrics[key])  # before: i2t_r1 = t2i_r1 = 1.0
    assert "image embeddings hold NaN" in metrics["non_finite"]
    assert "text embeddings hold NaN" in metrics["non_finite"]
    assert metrics["chance"]["i2t_r1"] == fine["chance"]["i2t_r1"]  # what guessing scores stays known
    cfg = from_preset("tiny")
    text = summary(cfg, 1, {"step": 3, **metrics}, 1.0)
    assert "NOT SCORED" in text and "image embeddings hold NaN" in text and "100.0%" not in text


class _InfImages(torch.nn.Module):
    """Wraps a model; its image embeddings overflow to +inf (normalising them would give NaN)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) * math.inf

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(t)


def test_infinite_embeddings_are_named(tiny_eval):
    model, tokenizer, data = tiny_eval
    metrics = evaluate(_InfImages(model), tokenizer, data, torch.device("cpu"))
    assert metrics["non_finite"].startswith("image embeddings hold inf")
    assert all(math.isnan(metrics[k]) for k in _metric_keys(metrics))


class _Oracle(torch.nn.Module):
    """An image is the one-hot of its caption's index; a text the one-hot of itself."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 2).float()

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(t[:, 0], 2).float()


def test_chance_of_half_or_more_is_not_meaningful(tmp_path):
    index = torch.tensor([0, 1, 0, 1])
    images = index.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    task = ZeroShotTask("ab", ["a", "b"], [["a"], ["b"]], index.numpy())
    data = EvalData(images, [["a", "b"][i] for i in index], [task], "4 images, 2 captions")
    tokenize = lambda batch: torch.tensor([[["a", "b"].index(t)] for t in batch])  # noqa: E731
    metrics = evaluate(_Oracle(), tokenize, data, torch.device("cpu"))
    assert metrics["i2t_r1"] == 1.0 and metrics["chance"]["i2t_r1"] == 0.5
    assert set(metrics["not_meaningful"]) == set(metrics["chance"])  # every metric: chance 50% or 100%
    cfg = from_preset("tiny", output=str(tmp_path))
    lines = summary(cfg, 1, {"step": 1, **metrics}, 1.0).splitlines()
    assert any("not meaningful" in line for line in lines[:4])  # said before the rows
    rows = [line for line in lines if "R@" in line or "zero-shot" in line]
    assert rows and all(line.endswith("not meaningful: chance >= 50%") for line in rows), rows
    many = np.arange(40) % 12  # 12 captions: R@1's chance is 1/12, meaningful; R@10's is 10/12
    texts = [f"t{i}" for i in range(12)]

    class Twelve(_Oracle):
        def encode_image(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 12).float()

        def encode_text(self, t):
            return torch.nn.functional.one_hot(t[:, 0], 12).float()

    data = EvalData(torch.as_tensor(many).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous(),
                    [texts[i] for i in many], [])
    metrics = evaluate(Twelve(), lambda b: torch.tensor([[texts.index(t)] for t in b]), data, torch.device("cpu"))
    assert "i2t_r1" not in metrics["not_meaningful"] and "i2t_r10" in metrics["not_meaningful"]


@pytest.mark.parametrize("max_bad_steps", ["10", "1"])
def test_a_diverging_run_exits_1_with_no_perfect_metric(tmp_path, capsys, max_bad_steps):
    """--lr 1e30: the first update sends the weights to ~1e29, the next forward overflows. With 10
    bad steps allowed the run ends and its evaluation is not scored; with 1 the loop stops first
    (NonFiniteError). Either way: exit 1, and no metric anywhere says 100%."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        code = megabatch([*TINY_RUN, "--lr", "1e30", "--steps", "3", "--max-bad-steps", max_bad_steps,
                          "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 1, printed.err
    assert "100.0%" not in printed.out + printed.err
    if max_bad_steps == "1":
        assert "--max-bad-steps 1" in printed.err
        assert not (out / "eval.json").exists()
        return
    assert "megabatch train: error: the trained model is not finite" in printed.err
    assert "NOT SCORED" in printed.out
    saved = json.loads((out / "eval.json").read_text())  # Python's json reads NaN back
    assert "image embeddings hold" in saved["non_finite"]
    for entry in (saved, *saved["history"]):
        for key in entry["chance"]:
            assert math.isnan(entry[key]), (key, entry[key])


def test_without_matplotlib_a_run_warns_and_ends_well(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.warns(RuntimeWarning, match="curves.png not drawn: matplotlib is not installed"):
        code = megabatch([*TINY_RUN, "--steps", "2", "--output", str(tmp_path)])
    assert code == 0
    assert "held-out eval at step 2" in capsys.readouterr().out
    assert (tmp_path / "eval.json").exists() and not (tmp_path / "curves.png").exists()


def test_python_dash_m_and_a_missing_train_extra(tmp_path):
    """One interpreter (torch imports once): `python -m megabatch --help` (runpy runs the package's
    __main__ as -m does) prints the commands; then, with Pillow made unimportable (None in
    sys.modules), `python -m megabatch train` and `python -m megabatch_train` both name the extra to
    install, exit 1 and show no traceback, while `megabatch train --help` still works."""
    run = f"""
import runpy, sys

def module(name, *args):
    sys.argv = [name, *args]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code
    return "no exit"

print("help", module("megabatch", "--help"), flush=True)
sys.modules["PIL"] = None
print("dispatch", module("megabatch", "train", "--preset", "tiny", "--steps", "1", "--output", "a"), flush=True)
print("module", module("megabatch_train", "--preset", "tiny", "--steps", "1", "--output", "b"), flush=True)
print("train-help", module("megabatch", "train", "--help") , flush=True)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # this checkout's sources first, as the tests import them
    done = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = done.stdout
    assert "usage: megabatch {" in out and "help 0" in out, (out, done.stderr[-3000:])
    assert "dispatch 1" in out and "module 1" in out and "train-help 0" in out, (out, done.stderr[-3000:])
    assert done.stderr.count("megabatch train needs the [train] extra: pip install 'megabatch[train]'") == 2
    assert "Traceback" not in done.stderr, done.stderr


def test_missing_extra_names_the_extra_that_brings_the_module():
    from megabatch.cli import missing_extra

    pil = ModuleNotFoundError("No module named 'PIL'", name="PIL")
    assert missing_extra(pil, "megabatch train", "train") == (
        "megabatch train needs the [train] extra: pip install 'megabatch[train]' (No module named 'PIL')")
    assert "[triton] extra" in missing_extra(ModuleNotFoundError("x", name="triton.language"), "megabatch bench",
                                             "bench")
    assert missing_extra(ModuleNotFoundError("x", name="nothing_of_ours"), "megabatch train", "train") is None
    assert missing_extra(ImportError("no name"), "megabatch train", "train") is None  # shown as it is


def _parsers():
    from megabatch.bench.single import build_parser
    from megabatch.plan import _parser as plan_parser
    from megabatch_train.config.flags import build_parser as train_parser
    from megabatch_train.studies.study import build_parser as study_parser

    return {"train": train_parser(None), "study": study_parser(), "bench": build_parser(), "plan": plan_parser()}


@pytest.mark.parametrize("name", ["train", "study", "bench", "plan"])
def test_help_texts_are_whole(name):
    parser = _parsers()[name]
    assert parser.description.rstrip().endswith("."), parser.description  # study's stopped at "SigLIP,"
    bare = [a.option_strings[-1] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not bare, f"options of megabatch {name} without a help text: {bare}"
    assert f"usage: megabatch {name}" in parser.format_help()
