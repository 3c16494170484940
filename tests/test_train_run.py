"""megabatch_train end to end (tiny preset, CPU, single process): a run writes metrics.jsonl (one
object per logged step with step, loss, logit_scale, samples_per_s, peak_mem_mb), eval.json (zero-
shot top-1 and R@1/5/10 both ways, with chance levels and history), curves.png and a checkpoint;
the loss goes down and the held-out metrics beat chance; resuming from a mid-run checkpoint
reproduces the uninterrupted run's loss curve and final evaluation exactly; SigLIP trains its bias;
digits, a CSV table (with a missing image and an empty caption, skipped and counted) and webdataset
shards train too; a user model with encode_image/encode_text trains in bf16; the command line prints
the summary.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megabatch_train import from_preset, train
from megabatch_train.cli import main
from megabatch_train.run.identity import resume_config

STEP_KEYS = {"step", "loss", "logit_scale", "lr", "samples_per_s", "peak_mem_mb", "elapsed_s"}
EVAL_KEYS = {"zero_shot_top1", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "chance", "step"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    final = train(from_preset("tiny", output=str(out), progress=False, eval_every=15))
    return out, final


def test_outputs(tiny_run):
    out, final = tiny_run
    logged = records(out)
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    for r in logged:
        assert STEP_KEYS <= set(r) and np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0
    ev = json.loads((out / "eval.json").read_text())
    assert EVAL_KEYS <= set(ev) and ev["step"] == 30 and [h["step"] for h in ev["history"]] == [15, 30]
    assert {k: v for k, v in ev.items() if k != "history"} == final
    assert set(ev["chance"]) >= {"zero_shot_top1", "i2t_r1", "t2i_r1"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoints" / "step_000030.pt", weights_only=False)
    assert ckpt["step"] == 30 and {"model", "optimizer", "scheduler", "rng", "tokenizer", "config"} <= set(ckpt)
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"


def test_loss_goes_down_and_beats_chance(tiny_run):
    out, final = tiny_run
    losses = [r["loss"] for r in records(out)]
    assert losses[0] > np.log(64) - 0.1  # starts near chance: ln(batch)
    assert np.mean(losses[-2:]) < losses[0] - 0.25
    assert final["i2t_r10"] > 2 * final["chance"]["i2t_r10"]


def test_resume_reproduces_the_uninterrupted_curve(tmp_path):
    full = tmp_path / "full"
    # Dropout makes the curve depend on the RNG state, which the checkpoint must carry.
    base = dict(steps=8, warmup_steps=2, log_every=1, ckpt_every=4, keep_checkpoints=3, progress=False, dropout=0.1)
    end_full = train(from_preset("tiny", output=str(full), **base))
    resumed = tmp_path / "resumed"
    cfg = resume_config(full / "checkpoints" / "step_000004.pt", {"output": str(resumed)})
    end_resumed = train(cfg)
    a, b = records(full), records(resumed)
    assert [r["step"] for r in b] == [5, 6, 7, 8]
    curve = lambda rs: [(r["loss"], r["logit_scale"], r["lr"]) for r in rs]  # noqa: E731
    assert curve(a[4:]) == curve(b)
    assert {k: end_full[k] for k in EVAL_KEYS} == {k: end_resumed[k] for k in EVAL_KEYS}
    # Resuming in place (the run directory itself) keeps the log up to the checkpoint.
    cfg = resume_config(full / "checkpoints" / "step_000004.pt", {})
    train(cfg)
    assert [r["loss"] for r in records(full)] == [r["loss"] for r in a]


def test_siglip_trains_its_bias(tmp_path):
    train(from_preset("tiny", loss="siglip", steps=4, log_every=2, logit_bias_init=-10.0, output=str(tmp_path),
                      progress=False))
    logged = records(tmp_path)
    assert all("logit_bias" in r for r in logged) and logged[-1]["logit_bias"] != -10.0
    assert logged[0]["logit_scale"] == pytest.approx(10.0, rel=0.05)


class _LinearClip(torch.nn.Module):
    """A user model: anything with encode_image / encode_text / logit_scale plugs in."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(3 * 32 * 32, 16), torch.nn.EmbeddingBag(300, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        return self.image(images.flatten(1))

    def encode_text(self, ids):
        return self.text(ids)


def test_user_model_in_bf16(tmp_path):
    model = _LinearClip()
    before = model.image.weight.detach().clone()
    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = [[sum(map(ord, w)) % 300 for w in t.split()][:6] for t in texts]
        return torch.tensor([row + [0] * (6 - len(row)) for row in ids])

    final = train(from_preset("tiny", steps=2, precision="bf16", output=str(tmp_path), progress=False), model=model,
                  tokenizer=tokenize)
    assert not torch.equal(model.image.weight, before) and np.isfinite(records(tmp_path)[-1]["loss"])
    assert 0 <= final["i2t_r1"] <= 1


def test_digits(tmp_path):
    final = train(from_preset("tiny", data="digits", steps=3, image_size=16, output=str(tmp_path), progress=False))
    assert final["n_texts"] == 10 and 0 <= final["zero_shot_digit_top1"] <= 1


def test_csv_with_bad_rows_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = ["filepath\ttitle"]
    for i in range(40):
        pixels = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\tpicture number {i}")
    rows += ["missing.png\tgone", "3.png\t "]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping"):
        code = main(["--preset", "tiny", "--data", f"csv:{tmp_path / 'pairs.tsv'}", "--eval-data",
                     f"csv:{tmp_path / 'pairs.tsv'}", "--eval-size", "16", "--steps", "2", "--log-every", "1",
                     "--batch-size", "32", "--micro-batch-size", "16", "--context-length", "24", "--output", str(out),
                     "--no-progress", "--workers", "0"])  # workers' warnings would go to their own stderr
    assert code == 0
    logged = records(out)
    assert len(logged) == 2 and logged[-1]["data_skipped"] >= 1
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_images"] == 16 and "i2t_r1" in ev and "zero_shot_top1" not in ev
    printed = capsys.readouterr().out
    assert "image->text R@1" in printed and "chance" in printed
    bare = tmp_path / "bare"  # no evaluation data: metrics and curves, no eval.json, and the summary says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--preset", "tiny", "--data", f"csv:{tmp_path / 'pairs.tsv'}", "--steps", "1", "--batch-size",
                     "8", "--micro-batch-size", "8", "--output", str(bare), "--no-progress", "--eval-split", "0"]) == 0
    assert (bare / "curves.png").exists() and (bare / "metrics.jsonl").exists() and not (bare / "eval.json").exists()
    printed = capsys.readouterr().out
    assert "no evaluation" in printed and "eval.json" not in printed.splitlines()[-1]


def test_webdataset_shards(tmp_path):
    import io
    import tarfile

    rng = np.random.default_rng(1)
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(12):
                buf = io.BytesIO()
                Image.fromarray((rng.random((9, 9, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"sample {shard} {i}".encode())):
                    info = tarfile.TarInfo(f"{shard:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "run"
    pattern = str(tmp_path / "shard-{0..1}.tar")
    final = train(from_preset("tiny", data=f"wds:{pattern}", eval_data=f"wds:{pattern}", eval_size=10, steps=2,
                              batch_size=16, micro_batch_size=8, context_length=16, output=str(out), progress=False))
    assert final["n_images"] == 10 and len(records(out)) == 1 and records(out)[0]["data_skipped"] == 0
