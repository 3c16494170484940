"""Run health and SigLIP's starting bias.

Contracts:
  * `collapse_warning` names both measured collapses -- image-image and text-text cosines near 1,
    and every pair at one cosine (the spread of the pair cosines near 0, e.g. sd 0.005 around
    0.31) -- with a likely cause (for SigLIP the bias against -ln(B-1)), and stays silent for a
    healthy run and before the warmup and a tenth of the run are over;
  * the collapse and recovery messages name the run's sides: image-image / text-text for image-text
    data, definition-definition / name-name for --data wordnet (never "image" there);
  * `embedding_stats` measures those numbers on a probe of the batch and leaves the model's mode;
  * `balanced_bias(B)` = -ln(B-1) (0 for B <= 2), the paper's -10 near B = 22k;
  * after a warning, "recovered" is said once and only when every statistic is on the healthy side
    of its threshold (one tower still pointing one way is no recovery);
  * a SigLIP run that collapses says so while it runs (a RuntimeWarning and "collapsed" in its
    metrics); a fresh SigLIP run's bias starts at -ln(B-1) with centred towers, balanced on the
    first batch without them, and at --logit-bias-init when given;
  * `Center` subtracts the batch mean in training (gradient through it), a running mean in
    evaluation; SigLIP's towers are centred by default, CLIP's not, and the flags override it.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from megabatch_train import from_preset, train
from megabatch_train.run.health import balanced_bias, collapse_warning, embedding_stats

HEALTHY = {"cos_image_image": 0.06, "cos_text_text": 0.06, "cos_pairs_mean": 0.05, "cos_pairs_sd": 0.43}


def test_balanced_bias():
    assert balanced_bias(2) == 0.0 and balanced_bias(1024) == pytest.approx(-math.log(1023))
    assert -10.2 < balanced_bias(22_000) < -9.9


def test_warning_names_both_collapses():
    one_way = {**HEALTHY, "cos_image_image": 0.99, "cos_text_text": 0.998}
    msg = collapse_warning(one_way, 40, 60, 25, "clip", 1024, 14.3, None)
    assert "points one way" in msg and "learning rate" in msg
    flat = {**HEALTHY, "cos_pairs_mean": 0.31, "cos_pairs_sd": 0.005}
    msg = collapse_warning(flat, 40, 60, 25, "siglip", 1024, 10.0, -10.0)
    assert "0.310" in msg and "sd 0.0050" in msg and "-ln(B-1) = -6.93" in msg and "c = 0.307" in msg
    assert collapse_warning(HEALTHY, 40, 60, 25, "siglip", 1024, 10.0, -6.9) is None
    assert collapse_warning(flat, 20, 60, 25, "siglip", 1024, 10.0, -10.0) is None  # still warming up


def test_warnings_name_the_runs_sides():
    """Image-text data says image-image / text-text; text-text data (--data wordnet: the eval data's sides
    ("definition", "name")) says definition-definition / name-name, and never "image"."""
    from megabatch_train.run.health import recovery_note
    from megabatch_train.run.step import check_health

    one_way = {**HEALTHY, "cos_image_image": 0.99, "cos_text_text": 0.998}
    flat = {**HEALTHY, "cos_pairs_mean": 0.31, "cos_pairs_sd": 0.005}
    msg = collapse_warning(one_way, 40, 60, 25, "clip", 1024, 14.3, None)
    assert "image-image cosines average 0.990 and text-text 0.998" in msg
    assert "every image-text pair has cosine 0.310" in collapse_warning(flat, 40, 60, 25, "clip", 1024, 14.3, None)
    text = ("definition", "name")
    msg = collapse_warning(one_way, 40, 60, 25, "clip", 1024, 14.3, None, text)
    assert "definition-definition cosines average 0.990 and name-name 0.998" in msg and "image" not in msg
    msg = collapse_warning(flat, 40, 60, 25, "siglip", 1024, 10.0, -10.0, text)
    assert "every definition-name pair has cosine 0.310" in msg and "image" not in msg
    note = recovery_note(HEALTHY, 15, text)
    assert "definition-definition cosine 0.060 and name-name 0.060" in note and "image" not in note
    assert "image-image cosine 0.060 and text-text 0.060" in recovery_note(HEALTHY, 15)
    # the loop's check passes the sides on: collapsed towers on token ids, then random ones
    cfg = from_preset("tiny", steps=30, warmup_steps=3)
    tokens = torch.randint(0, 9, (64, 8))
    warned: list[str] = []
    with pytest.warns(RuntimeWarning) as caught:
        check_health(cfg, _Constant(), tokens, tokens, {"step": 10, "logit_scale": 14.3}, warned, text)
    said = str(caught[0].message)
    assert said.startswith("embeddings collapsed at step 10: definition-definition cosines") and "image" not in said
    check_health(cfg, _Random(), tokens, tokens, {"step": 20, "logit_scale": 14.3}, warned, text)
    assert warned[-1].startswith("embeddings recovered by step 20: definition-definition cosine")


class _Constant(nn.Module):
    """Towers whose outputs are one vector plus tiny noise (a collapsed model)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def encode_image(self, x):
        return self.w + 1e-4 * x.flatten(1)[:, :8]

    def encode_text(self, t):
        return self.w + 1e-4 * t[:, :8].float()


def test_embedding_stats():
    model = _Constant().train()
    stats = embedding_stats(model, torch.randn(300, 3, 4, 4), torch.randint(0, 9, (300, 8)))
    assert model.training
    assert stats["cos_image_image"] > 0.999 and stats["cos_text_text"] > 0.999 and stats["cos_pairs_sd"] < 1e-3


def test_collapsing_siglip_run_says_so(tmp_path):
    # The paper's bias at batch 64 (-10 against -ln 63 = -4.1) collapses the tiny preset's uncentred towers.
    cfg = from_preset("tiny", loss="siglip", steps=12, warmup_steps=2, log_every=4, logit_bias_init=-10.0,
                      center=False, output=str(tmp_path), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("embeddings collapsed" in m for m in messages), messages
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["logit_bias"] == pytest.approx(-10.0, abs=0.05) and logged[-1].get("collapsed")
    assert {"cos_image_image", "cos_text_text", "cos_pairs_mean", "cos_pairs_sd"} <= set(logged[-1])


def _first_bias(tmp_path, **kw) -> float:
    train(from_preset("tiny", loss="siglip", steps=1, log_every=1, lr=1e-9, output=str(tmp_path), progress=False,
                      **kw))
    return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["logit_bias"]


def test_fresh_siglip_bias_starts_balanced(tmp_path):
    assert _first_bias(tmp_path / "c") == pytest.approx(balanced_bias(64), abs=1e-4)  # centred: -ln 63
    b = _first_bias(tmp_path / "u", center=False)  # uncentred: -ln 63 - t * c0, c0 measured on the first batch
    assert b != pytest.approx(balanced_bias(64), abs=1e-3) and -8 < b < 0
    assert _first_bias(tmp_path / "g", logit_bias_init=-3.0) == pytest.approx(-3.0, abs=1e-4)


def test_center():
    from megabatch_train.models.towers import Center, ContrastiveModel

    c = Center(3, momentum=0.5).train()
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], requires_grad=True)
    out = c(x)
    assert torch.allclose(out.sum(0), torch.zeros(3)) and torch.allclose(c.running_mean, torch.tensor([1.0, 1.0, 1.0]))
    out[0, 0].backward()
    assert torch.allclose(x.grad[:, 0], torch.tensor([0.5, -0.5]))  # through the mean
    c.eval()
    assert torch.allclose(c(x.detach()), x.detach() - 1.0)
    model_cfg = from_preset("tiny").model
    assert isinstance(ContrastiveModel(model_cfg, 50, "siglip").image_center, Center)
    assert isinstance(ContrastiveModel(model_cfg, 50, "clip").image_center, nn.Identity)
    model_cfg.center = True
    assert isinstance(ContrastiveModel(model_cfg, 50, "clip").text_center, Center)


class _Random(_Constant):
    """Towers whose outputs are unrelated random vectors (no collapse)."""

    def encode_image(self, x):
        return torch.randn(len(x), 8, generator=torch.Generator().manual_seed(1))

    def encode_text(self, t):
        return torch.randn(len(t), 8, generator=torch.Generator().manual_seed(2))


def test_collapse_then_recovery_is_said_once_each(capsys):
    from megabatch_train.run.step import check_health

    cfg = from_preset("tiny", steps=30, warmup_steps=3)
    images, tokens = torch.randn(64, 3, 4, 4), torch.randint(0, 9, (64, 8))
    warned: list[str] = []
    with pytest.warns(RuntimeWarning, match="embeddings collapsed at step 10"):
        check_health(cfg, _Constant(), images, tokens, {"step": 10, "logit_scale": 14.3}, warned)
    record = {"step": 20, "logit_scale": 14.3}
    check_health(cfg, _Random(), images, tokens, record, warned)
    check_health(cfg, _Random(), images, tokens, {"step": 25, "logit_scale": 14.3}, warned)
    assert "collapsed" not in record and capsys.readouterr().err.count("embeddings recovered by step 20") == 1


class _ImagesCollapsed(_Random):
    """An image tower that still maps every image one way, a text tower that does not."""

    def encode_image(self, x):
        return _Constant.encode_image(self, x)


def test_recovery_is_said_only_once_every_statistic_left_the_collapse(capsys):
    from megabatch_train.run.health import recovery_note
    from megabatch_train.run.step import check_health

    assert recovery_note({**HEALTHY, "cos_image_image": 0.995}, 15) is None  # one tower still one way
    assert recovery_note({**HEALTHY, "cos_pairs_sd": 0.005}, 15) is None  # pairs still at one cosine
    note = recovery_note(HEALTHY, 15)
    assert note.startswith("embeddings recovered by step 15") and "0.060" in note and "0.9" in note and "0.01" in note
    cfg = from_preset("tiny", steps=30, warmup_steps=3)
    images, tokens = torch.randn(64, 3, 4, 4), torch.randint(0, 9, (64, 8))
    warned: list[str] = []
    with pytest.warns(RuntimeWarning, match="embeddings collapsed at step 5"):
        check_health(cfg, _Constant(), images, tokens, {"step": 5, "logit_scale": 14.3}, warned)
    half = {"step": 15, "logit_scale": 14.3}
    check_health(cfg, _ImagesCollapsed(), images, tokens, half, warned)
    assert half["cos_image_image"] > 0.99 and half["cos_text_text"] < 0.9 and "recovered" not in capsys.readouterr().err
    check_health(cfg, _Random(), images, tokens, {"step": 20, "logit_scale": 14.3}, warned)
    assert capsys.readouterr().err.count("embeddings recovered by step 20") == 1
