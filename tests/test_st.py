"""megabatch.integrations.sentence_transformers in one process: equal to ST's MNRL and CachedMNRL.

Every gradient of a tiny random BertModel (tests/_st_models.py) and the loss value, one-way and
symmetric, with and without GradCache; lists of positives, hashed duplicates and SigLIP against
megabatch's float64 references on the same embeddings; bad input.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the [st] extra (sentence-transformers) is not installed")

import _st_models  # noqa: E402

import megabatch as mb  # noqa: E402
from megabatch.integrations.sentence_transformers import MegabatchLoss, text_hash  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

SYM = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = _st_models.build(str(tmp_path_factory.mktemp("st") / "tiny")).double()
    return m


def columns(model, n: int, k: int, seed: int):
    return [model.preprocess(_st_models.sentences(n, seed + c)) for c in range(k)]


def run(loss_fn, model, feats):
    model.zero_grad(set_to_none=True)
    loss = loss_fn([dict(f) for f in feats], None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la.double(), lb.double(), rtol=1e-9, atol=1e-12)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("sym", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("negatives", [0, 2])
def test_equals_mnrl(model, sym, negatives):
    feats = columns(model, 6, 2 + negatives, seed=1)
    extra = SYM if sym else {}
    ours = run(MegabatchLoss(model, **extra), model, feats)
    assert_same(ours, run(st_losses.MultipleNegativesRankingLoss(model, **extra), model, feats))


@pytest.mark.parametrize("sym", [False, True], ids=["one_way", "symmetric"])
def test_gradcache_equals_cached_mnrl(model, sym):
    feats = columns(model, 7, 3, seed=2)
    extra = SYM if sym else {}
    ours = run(MegabatchLoss(model, mini_batch_size=3, **extra), model, feats)
    theirs = run(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **extra), model, feats)
    assert_same(ours, theirs)



def test_gradcache_mini_batches_are_sorted_and_trimmed(model):
    """GradCache encodes each column's rows shortest first and drops a mini-batch's all-padding columns:
    with one long text among short ones only the last mini-batch pays its width; the loss and every
    gradient equal the whole batch's (no GradCache, full padding)."""
    texts = _st_models.sentences(8, 11)
    anchors = [" ".join(["w1"] * 12)] + [t.split()[0] for t in texts[1:]]  # one 12-word anchor, seven of one word
    feats = [model.preprocess(anchors), model.preprocess(texts)]
    widths = []
    first = model[0]
    real_forward = first.forward

    def spy(features, *args, **kwargs):
        widths.append((features["input_ids"].shape[1], features["attention_mask"].sum(1).tolist()))
        return real_forward(features, *args, **kwargs)

    first.forward = spy
    try:
        ours = run(MegabatchLoss(model, mini_batch_size=3), model, feats)
    finally:
        del first.forward
    assert feats[0]["input_ids"].shape[1] == 14 and len(widths) == 2 * 2 * 3  # 2 passes, 2 columns, 3 minis
    for width, lengths in widths:
        assert lengths == sorted(lengths) and width == max(lengths), widths
    assert sum(w == 14 for w, _ in widths) == 2  # only the long anchor's mini-batch, once a pass (texts: <= 8)
    assert_same(ours, run(MegabatchLoss(model), model, feats))

def test_evaluation_in_mini_batches(model):
    feats = columns(model, 7, 3, seed=6)
    with torch.no_grad():
        whole = MegabatchLoss(model, **SYM)([dict(f) for f in feats])
        mini = MegabatchLoss(model, mini_batch_size=3, **SYM)([dict(f) for f in feats])
        theirs = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **SYM)
        cached = theirs([dict(f) for f in feats], None)
    torch.testing.assert_close(mini, whole, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mini, cached, rtol=1e-9, atol=1e-12)


def embeddings(model, feats):
    with torch.no_grad():
        return [torch.nn.functional.normalize(model(dict(f))["sentence_embedding"], dim=-1) for f in feats]


def test_lists_of_positives_against_reference(model):
    feats = columns(model, 5, 4, seed=3)  # anchor, 2 positives, 1 negative
    loss = MegabatchLoss(model, positive_columns=2, **SYM)
    with torch.no_grad():
        value = loss([dict(f) for f in feats])
    x, *ys = embeddings(model, feats)
    ids = torch.arange(5)
    ref = mb.clip_loss_reference(x, torch.cat(ys), 20.0, image_ids=ids,
                                 text_ids=torch.cat([ids, ids, -1 - ids]), directions="both")
    torch.testing.assert_close(value, ref.to(value.dtype), rtol=1e-9, atol=1e-12)


def test_duplicates_are_positives_by_input_ids(model):
    # Without dropout equal texts have equal embeddings and merging them changes no one-way term;
    # with dropout they differ, and only ids taken from the input ids can still pair them.
    anchors = ["w1 w2", "w3", "w1 w2", "w4 w5 w6", "w7"]
    positives = ["w8", "w9 w9", "w10", "w9 w9", "w8"]
    feats = [model.preprocess(anchors), model.preprocess(positives)]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    was_training = model.training
    model.train()
    for m in dropouts:
        m.p = 0.3
    try:
        for mode, groups in (("anchor", [0, 1, 0, 3, 4]), ("positive", [0, 1, 2, 1, 0])):
            torch.manual_seed(7)
            x, y = embeddings(model, feats)  # the same dropout masks as the loss's two calls below
            assert not torch.equal(x[0], x[2]) and not torch.equal(y[1], y[3])
            with torch.no_grad():
                torch.manual_seed(7)
                value = MegabatchLoss(model, positives=mode)([dict(f) for f in feats])
                torch.manual_seed(7)
                plain = MegabatchLoss(model)([dict(f) for f in feats])
            g = torch.tensor(groups)
            ref = mb.clip_loss_reference(x, y, 20.0, image_ids=g, text_ids=g, directions="image_to_text")
            torch.testing.assert_close(value, ref.to(value.dtype), rtol=1e-9, atol=1e-12, msg=mode)
            assert (plain - value).abs() > 1e-6, mode
    finally:
        for m in dropouts:
            m.p = 0.0
        model.train(was_training)


def test_hash_ignores_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 0, 0, 0], [6, 5, 7, 0, 0]])
    mask = (ids != 0).long()
    h = text_hash(ids, mask)
    assert h[0] == h[1] and len({h[0].item(), h[2].item(), h[3].item()}) == 3 and (h >= 0).all()


def test_siglip_learnable_against_reference(model):
    feats = columns(model, 6, 3, seed=4)
    loss = MegabatchLoss(model, loss="siglip", scale=10.0, bias=-5.0, learnable=True)
    value = loss([dict(f) for f in feats])
    value.backward()
    x, *ys = embeddings(model, feats)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    ref = mb.siglip_loss_reference(x, torch.cat(ys), s, b)
    ref.backward()
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.norm.logit_bias.grad.double(), b.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss.norm.logit_scale.grad.double(), s.grad * 10.0, rtol=1e-5, atol=1e-8)
    model.zero_grad(set_to_none=True)


def test_siglip_starts_where_the_paper_does_unless_given(model):
    """loss="siglip" without scale or bias is SigLIP at t = 10, b = -10 (it used to take CLIP's 20);
    a numpy.float32 scale and bias are numbers like any other."""
    np = pytest.importorskip("numpy")
    feats = columns(model, 5, 2, seed=8)
    x, y = embeddings(model, feats)
    with torch.no_grad():
        default = MegabatchLoss(model, loss="siglip")
        value = default([dict(f) for f in feats])
        numpy_value = MegabatchLoss(model, loss="siglip", scale=np.float32(10), bias=np.float32(-10))(
            [dict(f) for f in feats])
        clip = MegabatchLoss(model, scale=np.float32(20))([dict(f) for f in feats])
    assert (default.get_config_dict()["scale"], default.get_config_dict()["bias"]) == (10.0, -10.0)
    assert MegabatchLoss(model).get_config_dict()["scale"] == 20.0
    ref = mb.siglip_loss_reference(x, y, 10.0, -10.0)
    torch.testing.assert_close(value, ref.to(value.dtype), rtol=1e-9, atol=1e-12)
    assert torch.equal(numpy_value, value)
    ref = mb.clip_loss_reference(x, y, 20.0, directions="image_to_text")
    torch.testing.assert_close(clip, ref.to(clip.dtype), rtol=1e-9, atol=1e-12)


def test_bad_scalars_and_ranks_per_node(model):
    with pytest.raises(TypeError, match=r"scale must be a positive real number \(float, int, numpy.float32, ...\) "
                                        "or None, got str"):
        MegabatchLoss(model, scale="20")
    with pytest.raises(ValueError, match="scale must be a positive finite number, got 0"):
        MegabatchLoss(model, loss="siglip", scale=0)
    with pytest.raises(TypeError, match=r"bias must be a real number \(float, int, numpy.float32, ...\) or None, "
                                        "got complex"):
        MegabatchLoss(model, loss="siglip", bias=1j)
    with pytest.raises(ValueError, match="ranks_per_node is only for strategy='hierarchical', got strategy='ring'"):
        MegabatchLoss(model, strategy="ring", ranks_per_node=2)
    with pytest.raises(TypeError, match="ranks_per_node must be an int or None, got str"):
        MegabatchLoss(model, strategy="hierarchical", ranks_per_node="2")


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="infonce"), "loss must be one of"),
    (dict(directions=("query_to_doc", "query_to_query")), "directions must be"),
    (dict(directions=("query_to_doc", "doc_to_query")), "partition_mode='per_direction'"),
    (dict(positive_columns=0), "positive_columns"),
    (dict(positives="text"), "positives must be one of"),
    (dict(mini_batch_size=0), "mini_batch_size"),
    (dict(strategy="tree"), "strategy"),
    (dict(bias=-10.0), "bias is SigLIP's"),
])
def test_bad_options(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MegabatchLoss(model, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword"):
        MegabatchLoss(model, gather_across_devices=True)


def test_bad_columns(model):
    feats = columns(model, 4, 3, seed=5)
    with pytest.raises(ValueError, match="every anchor needs a positive"):
        MegabatchLoss(model, positive_columns=2)([dict(feats[0]), dict(feats[1])])
    with pytest.raises(ValueError, match=r"different row counts \[4, 3\]"):
        MegabatchLoss(model)([dict(feats[0]), {k: v[:3] for k, v in feats[1].items()}])
    with pytest.raises(TypeError, match="column 1 is not a text column"):
        MegabatchLoss(model)([dict(feats[0]), {"pixel_values": torch.zeros(4, 3)}])


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "megabatch.integrations.sentence_transformers")
    with pytest.raises(ImportError, match=r"pip install 'megabatch\[st\]'"):
        importlib.import_module("megabatch.integrations.sentence_transformers")


def test_docs_switch_block_trains(tmp_path):
    """The python block of docs/integrations.md that says it is run here: one step, float32."""
    from datasets import Dataset

    page = (Path(__file__).parent.parent / "docs" / "integrations.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    block = next(b for b in blocks if b.startswith("# run by tests/test_st.py"))
    model = _st_models.build(str(tmp_path / "m"))
    train_dataset = Dataset.from_dict({"anchor": _st_models.sentences(64, 1), "positive": _st_models.sentences(64, 2)})
    before = next(model.parameters()).detach().clone()
    exec(block, {"model": model, "train_dataset": train_dataset, "output_dir": str(tmp_path / "out")})
    assert not torch.equal(before, next(model.parameters()).detach())  # it trained
