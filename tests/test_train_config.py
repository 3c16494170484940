"""megabatch_train.config: presets fill a typed config, flags override them, and every bad flag or
inconsistent value is refused with exit status 2 and a message naming the flag (argparse for
unknown flags/choices, validate() for values), in two lines without argparse's usage block;
--resume keeps the saved run and refuses flags that would change it; the tokenizer pads after
<cls>, maps unknown words to <unk>, and falls back to bytes.
"""
from __future__ import annotations

import pytest
import torch

from megabatch_train.config.flags import parse_args
from megabatch_train.config.sections import PRESETS, TrainConfig, from_preset
from megabatch_train.data.tokenizer import CLS, PAD, UNK, Tokenizer
from megabatch_train.run.identity import resume_config


def test_presets_validate_and_flags_override():
    for name in PRESETS:
        cfg = from_preset(name)
        assert cfg.preset == name and cfg.micro_batch_size <= cfg.batch_size
    cfg, given = parse_args(["--preset", "demo", "--loss", "siglip", "--steps", "7", "--image-size", "16"])
    assert (cfg.loss, cfg.steps, cfg.batch_size, cfg.model.image_size) == ("siglip", 7, 4096, 16)
    assert given == {"loss": "siglip", "steps": 7, "image_size": 16}
    assert cfg.batch_size >= 4096 and cfg.micro_batch_size < cfg.batch_size  # the demo uses GradCache
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_centring_is_decided_by_model_config_centred():
    # The default (None): SigLIP's towers are centred, CLIP's not; --center / --no-center override it.
    for loss, default in (("clip", False), ("siglip", True)):
        assert from_preset("tiny", loss=loss).model.centred(loss) is default
        assert from_preset("tiny", loss=loss, center=not default).model.centred(loss) is (not default)
        # A config saved before the field existed ran uncentred, SigLIP's too; one saved with None keeps None.
        saved = from_preset("tiny", loss=loss).to_dict()
        assert TrainConfig.from_dict(saved).model.center is None
        del saved["model"]["center"]
        assert TrainConfig.from_dict(saved).model.centred(loss) is False


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--loss", "triplet"], "--loss"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "many"], "--batch-size"),
        (["--micro-batch-size", "512", "--batch-size", "256"], "--micro-batch-size"),
        (["--steps", "-3"], "--steps"),
        (["--lr", "0"], "--lr"),
        (["--data", "imagenet"], "--data"),
        (["--data", "csv:"], "--data"),
        (["--eval-data", "nothing"], "--eval-data"),
        (["--precision", "fp8"], "--precision"),
        (["--strategy", "tree"], "--strategy"),
        (["--image-size", "30"], "image_size"),
        (["--dropout", "1.5"], "dropout"),
        (["--preset", "huge"], "--preset"),
        (["--bogus-flag"], "--bogus-flag"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    # two lines: the error naming the flag and a pointer to --help; no 27-line usage block before it
    assert err.startswith("megabatch train: error: ") and needle in err.splitlines()[0], err
    assert len(err.splitlines()) == 2 and "megabatch train --help" in err and "usage:" not in err


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="--keep-checkpoints"):
        from_preset("tiny", keep_checkpoints=0)
    with pytest.raises(ValueError, match="unknown config fields: nonsense"):
        from_preset("tiny", nonsense=1)


def test_resume_config_keeps_the_run_and_refuses_changes(tmp_path):
    cfg = from_preset("tiny", output=str(tmp_path / "a"))
    ckpt = tmp_path / "step_000003.pt"
    torch.save({"config": cfg.to_dict()}, ckpt)
    resumed = resume_config(ckpt, {"steps": 50, "output": str(tmp_path / "b"), "batch_size": cfg.batch_size})
    assert resumed.steps == 50 and resumed.output == str(tmp_path / "b") and resumed.resume == str(ckpt)
    assert resumed.model == cfg.model and resumed.lr == cfg.lr
    with pytest.raises(ValueError, match="--loss cannot change"):
        resume_config(ckpt, {"loss": "siglip"})
    with pytest.raises(ValueError, match="--image-size cannot change"):
        resume_config(ckpt, {"image_size": 64})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume_config(tmp_path / "nowhere", {})


def test_tokenizer_word_and_byte():
    tok = Tokenizer(6, ["red", "circle", "two"])
    ids = tok(["Two red circles", "red"])
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    assert ids[0].tolist() == [CLS, 5, 3, UNK, PAD, PAD]
    assert ids[1].tolist() == [CLS, 3, PAD, PAD, PAD, PAD]
    assert tok(["red " * 10])[0].tolist() == [CLS] + [3] * 5  # truncated to the context
    assert Tokenizer.from_state_dict(tok.state_dict())(["two red"]).tolist() == tok(["two red"]).tolist()
    raw = Tokenizer(4)
    assert raw.vocab_size == 259 and raw(["ab"])[0].tolist() == [CLS, 3 + 97, 3 + 98, PAD]
    assert tok([]).shape == (0, 6)


def test_positives_flag_and_ids():
    """--positives: index gives no ids; caption gives equal ids exactly for identical captions (stable
    across processes: a hash, not Python's hash()); id needs an id column, and auto picks it."""
    from megabatch_train.config.flags import parse_args
    from megabatch_train.run.step import positive_ids

    caps = ["a red dog", "a blue cat", "a red dog", "a red dog "]
    ids = positive_ids("caption", caps, None)
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and len({int(i) for i in ids}) == 3
    assert torch.equal(ids, positive_ids("caption", list(caps), None))
    assert positive_ids("index", caps, None) is None
    given = torch.tensor([7, 8, 7, 9])
    assert torch.equal(positive_ids("id", caps, given), given)
    with pytest.raises(ValueError, match="no per-pair ids"):
        positive_ids("id", caps, None)
    cfg, _ = parse_args(["--preset", "tiny"])
    assert cfg.positives == "auto" and cfg.resolved_positives() == "caption"
    cfg, _ = parse_args(["--preset", "tiny", "--data", "csv:x.csv", "--csv-id-key", "group"])
    assert cfg.resolved_positives() == "id"
    with pytest.raises(SystemExit) as exc:
        parse_args(["--preset", "tiny", "--positives", "id"])
    assert exc.value.code == 2
