"""megabatch_train data: the synthetic shapes are deterministic in (seed, step, index) -- a rank's
slice equals the same rows of the whole global batch -- and every image shows exactly what its
caption says (colour, count, quadrant, shape by area); held-out combinations never appear in
training yet every attribute value does; the zero-shot task and retrieval set are consistent;
sklearn's digits stream likewise; the evaluation of a perfect model is 1.0 everywhere and chance
levels are right.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megabatch_train.data import synthetic as syn
from megabatch_train.data.digits import Digits
from megabatch_train.data.types import EvalData, ZeroShotTask
from megabatch_train.evaluation.evaluate import evaluate


def test_deterministic_and_sliceable():
    d = syn.SyntheticShapes(32, seed=3)
    images, captions = d.batch(5, 96, 0, 96)
    again, again_caps = d.batch(5, 96, 0, 96)
    assert images.shape == (96, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images, again) and captions == again_caps
    parts = [d.batch(5, 96, a, a + 32) for a in (0, 32, 64)]
    assert torch.equal(torch.cat([p[0] for p in parts]), images)
    assert sum((p[1] for p in parts), []) == captions
    assert d.batch(6, 96, 0, 96)[1] != captions
    assert syn.SyntheticShapes(32, seed=4).batch(5, 96, 0, 96)[1] != captions


def _decode(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool object mask and the objects' mean RGB, from a normalised (3, H, W) image."""
    rgb = (image.permute(1, 2, 0).numpy() * 80.0 + 80.0).round()
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    ground = colours[counts.argmax()]  # objects cover under a fifth of the image
    mask = np.abs(rgb - ground).sum(-1) > 1
    return mask, rgb[mask].mean(0)


@pytest.mark.parametrize("size", [32, 24])
def test_images_show_what_captions_say(size):
    d = syn.SyntheticShapes(size, seed=0)
    rng = np.random.default_rng(11)
    attrs, (cells, jitter, tint) = syn.sample(rng, d.train_combos, 200, size)
    images = syn.render(attrs, cells, jitter, tint, size)
    areas = syn._sprites(size // 4 - 1).reshape(5, -1).sum(1)
    names = list(syn.COLOURS)
    half = size // 2
    for img, (shape, colour, count, position) in zip(images, attrs):
        mask, mean_rgb = _decode(img)
        assert mask.sum() == (count + 1) * areas[shape]  # count objects of that shape, no overlap
        nearest = np.argmin(((syn._RGB - mean_rgb) ** 2).sum(1))
        assert names[nearest] == names[colour]
        ys, xs = np.nonzero(mask)
        top, left = position // 2 == 0, position % 2 == 0
        assert (ys < half).all() if top else (ys >= half).all()
        assert (xs < half).all() if left else (xs >= half).all()
    caption = syn.caption(*attrs[0])
    words = caption.split()
    assert words[0] == syn.COUNTS[attrs[0][2]] and words[1] == names[attrs[0][1]]
    assert caption.endswith(syn.POSITIONS[attrs[0][3]])


def test_held_out_split_and_eval_set():
    d = syn.SyntheticShapes(32, seed=0, eval_per_combo=2)
    train = {tuple(c) for c in d.train_combos.tolist()}
    held = {tuple(c) for c in d.held_out_combos.tolist()}
    assert not train & held and len(train) + len(held) == 640 and len(held) == 128
    for col, values in enumerate(syn.ATTRIBUTES.values()):
        assert {c[col] for c in train} == set(range(len(values)))
    held_captions = {syn.caption(*c) for c in held}
    for step in range(3):
        assert not set(d.batch(step, 512, 0, 512)[1]) & held_captions
    ev = d.eval_set()
    assert ev.images.shape == (256, 3, 32, 32) and set(ev.captions) == held_captions
    (task,) = ev.tasks
    assert len(task.classes) == 640 and [task.classes[i] for i in task.labels] == ev.captions
    assert set(task.attributes) == set(syn.ATTRIBUTES)
    assert set(d.vocabulary) == {w for c in syn.all_combinations() for w in syn.caption(*c).split()}


def test_digits_stream():
    d = Digits(image_size=16, seed=0)
    images, captions = d.batch(2, 40, 10, 30)
    full, full_caps = d.batch(2, 40, 0, 40)
    assert images.shape == (20, 3, 16, 16) and torch.equal(images, full[10:30]) and captions == full_caps[10:30]
    assert all(any(n in c.split() for n in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                             "eight", "nine")) for c in captions)
    ev = d.eval_set()
    assert ev.images.shape == (300, 3, 16, 16) and len(ev.tasks[0].classes) == 10
    assert all(w in d.vocabulary for c in ev.captions for w in c.split())


class _Oracle(torch.nn.Module):
    """Encodes an image as the one-hot of its caption and a text as the one-hot of itself."""

    def __init__(self, texts: list[str], perfect: bool):
        super().__init__()
        self.texts, self.perfect = texts, perfect

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.one_hot(ids[:, 0, 0, 0].long(), len(self.texts)).float()
        return out if self.perfect else torch.ones_like(out)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids[:, 0], len(self.texts)).float()


def test_evaluate_perfect_and_constant_models():
    texts = [f"t{i}" for i in range(12)]
    caption_ids = torch.arange(40) % 12
    images = caption_ids.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    labels = (caption_ids % 3).numpy()
    task = ZeroShotTask("mod3", ["a", "b", "c"], [[t for t in texts if int(t[1:]) % 3 == c] for c in range(3)], labels,
                        {"parity": np.array([0, 1, 0])})
    data = EvalData(images, [texts[i] for i in caption_ids], [task])
    tokenize = lambda batch: torch.tensor([[texts.index(t)] for t in batch])  # noqa: E731
    good = evaluate(_Oracle(texts, True), tokenize, data, torch.device("cpu"), batch=7)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "zero_shot_top1", "zero_shot_parity_top1"):
        assert good[key] == 1.0, key
    assert good["n_images"] == 40 and good["n_texts"] == 12
    chance = good["chance"]
    assert chance["i2t_r1"] == pytest.approx(1 / 12) and chance["i2t_r10"] == pytest.approx(10 / 12)
    assert chance["zero_shot_top1"] == pytest.approx(14 / 40)  # majority class
    flat = evaluate(_Oracle(texts, False), tokenize, data, torch.device("cpu"))  # collapsed: all ties
    assert flat["i2t_r1"] == 0.0 and flat["t2i_r1"] == 0.0 and flat["i2t_r10"] == 0.0


@pytest.mark.parametrize("size", [24, 32, 64])
def test_shapes_stay_distinct(size):
    sprites = syn._sprites(size // 4 - 1).reshape(5, -1)
    assert len({s.tobytes() for s in sprites}) == 5
    with pytest.raises(ValueError, match="image_size"):
        syn.SyntheticShapes(20)
