"""GradCache (single process): after ``gc(images, texts, *loss_args)`` every parameter's ``.grad``
(both towers, logit_scale, logit_bias) holds exactly what one full-batch ``loss.backward()`` leaves,
for both losses and micro-batch sizes that do not divide the batch; dropout masks are replayed (the
reference is a full-batch backprop with the same masks); gradients accumulate into existing ``.grad``;
mapping/tuple inputs, bound-method encoders and frozen towers work; CPU bf16 autocast is honoured
(within 2x the error of a full-batch bf16 autocast backprop, both against float64); bad arguments
get ValueError/TypeError naming the argument. More texts than images (hard negatives) with positives
by ids: the same exact full-batch gradients. The DDP contract is in test_gradcache_ddp.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megabatch as mb

B, VOCAB, LEN = 13, 17, 6


class Towers(nn.Module):
    """Tiny image (MLP) and text (embedding + masked mean) towers with CLIP/SigLIP scalars."""

    def __init__(self, p: float = 0.0, dim: int = 7, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Dropout(p), nn.Linear(16, dim))
        self.emb = nn.Embedding(VOCAB, 16)
        self.txt = nn.Sequential(nn.Dropout(p), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))
        self.to(dtype)
        self.calls = {"image": 0, "text": 0}
        self.out_dtypes: list[torch.dtype] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["image"] += 1
        out = self.img(x)
        self.out_dtypes.append(out.dtype)
        return F.normalize(out, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls["text"] += 1
        h = self.emb(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return F.normalize(self.txt((h * m).sum(1) / m.sum(1).clamp_min(1)), dim=-1)


def batch(n: int = B, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 5, generator=g, dtype=dtype)
    ids = torch.randint(0, VOCAB, (n, LEN), generator=g)
    mask = (torch.rand(n, LEN, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return images, {"input_ids": ids, "attention_mask": mask}


def loss_and_args(kind: str, model: Towers) -> tuple:
    if kind == "clip":
        return (lambda x, y, s, **kw: mb.clip_loss(x, y, s, strategy="local", **kw)), (model.logit_scale.exp(),)
    fn = lambda x, y, s, b, **kw: mb.siglip_loss(x, y, s, b, strategy="local", **kw)  # noqa: E731
    return fn, (model.logit_scale.exp(), model.logit_bias)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_grads_equal(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        assert rel(got[name], want[name]) <= tol, f"{name}: rel err {rel(got[name], want[name]):.3g} > {tol}"


def full_batch(model: Towers, kind: str, images, texts) -> torch.Tensor:
    fn, args = loss_and_args(kind, model)
    loss = fn(model.encode_image(images), model.encode_text(**texts), *args)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("micro", [1, 4, 5, 13, 50])
def test_matches_full_batch(kind: str, micro: int) -> None:
    torch.manual_seed(0)
    model = Towers()
    ref = copy.deepcopy(model)
    images, texts = batch()
    want_loss = full_batch(ref, kind, images, texts)
    fn, args = loss_and_args(kind, model)
    gc = mb.GradCache(model.encode_image, model.encode_text, fn, micro)
    loss = gc(images, texts, *args)
    assert not loss.requires_grad
    assert rel(loss, want_loss) < 1e-12
    got, want = grads(model), grads(ref)
    assert "logit_scale" in want and (kind == "clip") == ("logit_bias" not in want)
    assert_grads_equal(got, want, 1e-10)
    assert model.calls == {"image": 2 * math.ceil(B / micro), "text": 2 * math.ceil(B / micro)}


def test_accumulates_into_existing_grad() -> None:
    torch.manual_seed(1)
    model = Towers()
    ref = copy.deepcopy(model)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.grad = torch.full_like(p, 0.25)
    images, texts = batch()
    full_batch(ref, "siglip", images, texts)
    fn, args = loss_and_args("siglip", model)
    mb.GradCache(model.encode_image, model.encode_text, fn, 4)(images, texts, *args)
    assert_grads_equal(grads(model), grads(ref), 1e-10)


def test_dropout_masks_replayed() -> None:
    torch.manual_seed(2)
    model = Towers(p=0.4)
    ref = copy.deepcopy(model)
    images, texts = batch()
    micro = 4
    fn, args = loss_and_args("clip", model)
    gc = mb.GradCache(model.encode_image, model.encode_text, fn, micro)
    torch.manual_seed(123)
    gc(images, texts, *args)
    after_gc = torch.rand(3)  # the caller's RNG stream continues as after the first (no-grad) pass

    def reference(model: Towers, seed: int) -> dict:
        # Same draws as GradCache's first pass: per micro-batch, image tower then text tower.
        torch.manual_seed(seed)
        img, txt = [], []
        for a in range(0, B, micro):
            img.append(model.encode_image(images[a : a + micro]))
            txt.append(model.encode_text(**{k: v[a : a + micro] for k, v in texts.items()}))
        rfn, rargs = loss_and_args("clip", model)
        rfn(torch.cat(img), torch.cat(txt), *rargs).backward()
        return grads(model)

    want = reference(ref, 123)
    assert torch.equal(torch.rand(3), after_gc)
    assert_grads_equal(grads(model), want, 1e-10)
    other = reference(copy.deepcopy(model).requires_grad_(True), 124)
    assert rel(other["img.0.weight"], want["img.0.weight"]) > 1e-3  # the masks do matter


def test_tuple_inputs_and_module_encoders() -> None:
    torch.manual_seed(3)
    img_tower = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6)).double()

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.EmbeddingBag(VOCAB, 6, mode="sum").double()

        def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return self.emb(ids, per_sample_weights=weights)

    txt_tower = Text()
    scale = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
    images, texts = batch()
    weights = torch.rand(B, LEN, dtype=torch.float64)
    towers = nn.ModuleList([img_tower, txt_tower])
    ref = copy.deepcopy(towers)
    ref_scale = nn.Parameter(scale.detach().clone())
    mb.clip_loss(ref[0](images), ref[1](texts["input_ids"], weights), ref_scale, strategy="local").backward()
    gc = mb.GradCache(img_tower, txt_tower, lambda x, y, s: mb.clip_loss(x, y, s, strategy="local"), 6)
    gc(images, (texts["input_ids"], weights), scale)
    assert_grads_equal(grads(towers), grads(ref), 1e-10)
    assert rel(scale.grad, ref_scale.grad) < 1e-10


def test_frozen_text_tower_is_not_rerun() -> None:
    torch.manual_seed(4)
    model = Towers()
    for p in list(model.emb.parameters()) + list(model.txt.parameters()):
        p.requires_grad_(False)
    ref = copy.deepcopy(model)
    images, texts = batch()
    full_batch(ref, "siglip", images, texts)
    fn, args = loss_and_args("siglip", model)
    mb.GradCache(model.encode_image, model.encode_text, fn, 5)(images, texts, *args)
    assert_grads_equal(grads(model), grads(ref), 1e-10)
    assert model.calls == {"image": 6, "text": 4}  # re-run once to see it needs no gradient


def test_bf16_autocast_within_twice_plain_error() -> None:
    torch.manual_seed(5)
    model = Towers(dtype=torch.float32)
    full = copy.deepcopy(model)
    exact = copy.deepcopy(model).double()
    images, texts = batch(n=32, dtype=torch.float32)
    full_batch(exact, "clip", images.double(), texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full_batch(full, "clip", images, texts)
        fn, args = loss_and_args("clip", model)
        mb.GradCache(model.encode_image, model.encode_text, fn, 5)(images, texts, *args)
    assert model.out_dtypes and all(d == torch.bfloat16 for d in model.out_dtypes)  # both passes autocast
    got, plain, want = grads(model), grads(full), grads(exact)
    for name in want:
        err, plain_err = rel(got[name], want[name]), rel(plain[name], want[name])
        assert plain_err > 1e-4, f"{name}: autocast had no effect"
        assert err <= 2 * plain_err + 1e-3, f"{name}: {err:.3g} vs plain bf16 {plain_err:.3g}"


def test_bad_arguments() -> None:
    model = Towers()
    fn, args = loss_and_args("clip", model)
    for bad, exc in ((0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="micro_batch_size"):
            mb.GradCache(model.encode_image, model.encode_text, fn, bad)
    with pytest.raises(TypeError, match="image_encoder"):
        mb.GradCache("not a model", model.encode_text, fn, 4)
    with pytest.raises(TypeError, match="loss_fn"):
        mb.GradCache(model.encode_image, model.encode_text, None, 4)
    with pytest.raises(TypeError, match="modules"):
        mb.GradCache(model.encode_image, model.encode_text, fn, 4, modules=[model, "x"])
    gc = mb.GradCache(model.encode_image, model.encode_text, fn, 4)
    images, texts = batch()
    with pytest.raises(ValueError, match="texts"):
        gc(images, {"input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"][:-2]}, *args)
    with pytest.raises(ValueError, match="empty"):
        gc(images[:0], {k: v[:0] for k, v in texts.items()}, *args)
    with pytest.raises(TypeError, match="images"):
        gc([1, 2, 3], texts, *args)
    with pytest.raises(RuntimeError, match="grad enabled"), torch.no_grad():
        gc(images, texts, *args)
    wrong = mb.GradCache(lambda x: model.encode_image(x)[:2], model.encode_text, fn, 4)
    with pytest.raises(ValueError, match="image_encoder returned shape"):
        wrong(images, texts, *args)
    not_loss = mb.GradCache(model.encode_image, model.encode_text, lambda x, y, s: {"loss": x.sum()}, 4)
    with pytest.raises(TypeError, match="loss_fn must return"):
        not_loss(images, texts, *args)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_more_texts_than_images_with_ids(kind):
    """9 images, 21 texts (two captions for some images, unrelated hard negatives), micro-batches of 4:
    the image tower runs 3 micro-batches, the text tower 6, and the gradients equal one full-batch
    backprop with the same ids."""
    torch.manual_seed(0)
    model = Towers()
    ref = copy.deepcopy(model)
    images, _ = batch(9, seed=3)
    _, texts = batch(21, seed=4)
    image_ids = torch.arange(9)
    text_ids = torch.cat([torch.arange(9), torch.arange(6), torch.arange(100, 106)])
    kw = dict(image_ids=image_ids, text_ids=text_ids)
    fn, args = loss_and_args(kind, model)
    loss = mb.GradCache(model.encode_image, model.encode_text, fn, 4)(images, texts, *args, **kw)
    assert model.calls == {"image": 3 * 2, "text": 6 * 2}
    ref_fn, ref_args = loss_and_args(kind, ref)
    want = ref_fn(ref.encode_image(images), ref.encode_text(**texts), *ref_args, **kw)
    want.backward()
    assert torch.allclose(loss, want.detach(), rtol=1e-12)
    assert_grads_equal(grads(model), grads(ref), 1e-10)
