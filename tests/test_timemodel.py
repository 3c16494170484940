"""The time model (src/megabatch/timemodel.py, `megabatch plan --time`): the flat ring's transfer is hidden
exactly when a step's compute covers it (the brief's arithmetic: b ~ 15,800 rows a rank over one NDR NIC at
790 TFLOP/s), every term is carried by --json, `auto` follows the model only where plan knows the layout,
and W from 8 to 1,024 gives a finite time for every option. Pure arithmetic: well under a second.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from megabatch import timemodel
from megabatch.cli import main
from megabatch.plan import shape_of


def _ring(b: int, hw: timemodel.Hardware, loss: str = "siglip", backend: str = "triton") -> dict:
    return timemodel.step_time(shape_of(loss, "ring", backend, 64, 64 * b, 64 * b, 512, "bfloat16", "cuda", False), hw)


def test_the_ring_hides_its_transfer_where_compute_covers_it():
    hw = replace(timemodel.GPUS["H200"], latency=0.0, kernel_floor=0.0)  # IB: W = 64 > 8 ranks a node
    ratio = timemodel.RATIO[("triton", "siglip")]
    even = round(hw.gemm_flops / (ratio * hw.inter_bw))  # 6 b^2 D ratio / flops = 6 b D / bw
    assert 11_000 < even < 12_500  # 15,800 at ratio 1 (the brief), / 1.35
    short, long = _ring(even // 4, hw), _ring(even * 4, hw)
    # below: transfer-bound, the compute hidden; above: compute-bound, the transfer hidden (but the first
    # step's send and the last hop home, which no compute covers)
    assert short["hidden_s"] == pytest.approx(short["compute_s"], rel=1e-9)
    assert long["time_s"] == pytest.approx(long["compute_s"], rel=0.05) and long["time_s"] > long["compute_s"]
    assert long["bytes_inter"] > 1000 * long["bytes_intra"]  # over NVLink: only the layout exchange's share
    # within one node (W <= 8) the same bytes go over NVLink, 9x faster
    intra = timemodel.step_time(shape_of("siglip", "ring", "triton", 8, 8 * 256, 8 * 256, 512, "bfloat16", "cuda",
                                         False), hw)
    assert intra["bytes_inter"] == 0 and intra["bytes_intra"] > 0


def test_small_blocks_are_launch_bound_and_latencies_add_up():
    hw = timemodel.GPUS["H200"]
    t = _ring(128, hw, loss="clip")
    # 2 passes of W steps and the hop home, plus the layout exchange (a collective: 2 log2 W hops)
    assert t["latency_s"] == pytest.approx((2 * (64 + 1) + 2 * 6) * hw.latency)
    assert t["compute_s"] >= 2 * 64 * 3 * hw.kernel_floor  # at least 3 launches a visit
    assert t["messages"] == 1 + (63 + 64) * 1 + (63 * 2 + 64)  # layout; texts and lse; texts + stats and grads


def test_bytes_and_messages_are_what_comm_counts():
    """The model's bytes equal the planner's (held exactly against _comm's counters by plan_check.py); its
    messages were counted on gloo by benchmarks/time_model_check.py (W = 2: CLIP ring 8, gather 6; SigLIP 4, 3)."""
    from megabatch.plan_terms import _sent
    hw = timemodel.GPUS["H200"]
    for loss in ("clip", "siglip"):
        for strategy in ("ring", "gather"):
            for ids in (False, True):
                for device in ("cpu", "cuda"):
                    for w in (2, 3, 16):
                        s = shape_of(loss, strategy, "torch", w, w * 512, w * 512, 256, "float32", device, ids)
                        t = timemodel.step_time(s, hw)
                        assert int(t["bytes_intra"] + t["bytes_inter"]) == _sent(s), (loss, strategy, ids, device, w)
    def messages(loss: str, st: str) -> float:
        return timemodel.step_time(shape_of(loss, st, "torch", 2, 1024, 1024, 256, "float32", "cpu", False),
                                   hw)["messages"]
    counts = {(loss, st): messages(loss, st) for loss in ("clip", "siglip") for st in ("ring", "gather")}
    assert counts == {("clip", "ring"): 8, ("clip", "gather"): 6, ("siglip", "ring"): 4, ("siglip", "gather"): 3}


@pytest.mark.parametrize("world", [8, 16, 64, 256, 1024])
def test_every_option_has_a_time_from_8_to_1024_ranks(capsys, world):
    assert main(["plan", "--loss", "clip", "--world", str(world), "--batch", "32768", "--dim", "512", "--time",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {o["strategy"] for o in out["options"]} == {"ring", "gather"}
    for o in out["options"]:
        assert math.isfinite(o["time_ms"]) and o["time_ms"] > 0
        terms = {"compute_s", "transfer_s", "latency_s", "hidden_s", "bytes_intra", "bytes_inter", "messages"}
        assert terms <= set(o["time_terms"])
    assert out["time_ms"] == min(o["time_ms"] for o in out["options"])  # auto: the fastest that fits
    assert out["hardware"]["name"] == "H200" and "predicted" in out["hardware"]["status"]


def test_auto_follows_the_model_only_when_asked(capsys):
    args = ["plan", "--loss", "clip", "--world", "256", "--batch", "32768", "--dim", "512", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "ring"  # the library's auto, unchanged
    assert main([*args, "--time"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "gather"  # 128 rows a rank: the ring is latency-bound
    assert main([*args, "--time", "--strategy", "ring"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "ring"  # an explicit choice is kept


@pytest.mark.parametrize("flag, value", [("--gemm-tflops", "0"), ("--inter-bw", "fast"), ("--ranks-per-node", "-8"),
                                         ("--gpu", "V100")])
def test_bad_hardware_is_a_usage_error(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--batch", "96", "--dim", "64", "--time", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_flags_override_the_preset(capsys):
    args = ["plan", "--world", "64", "--batch", "65536", "--dim", "512", "--time", "--json", "--strategy", "ring"]
    assert main(args) == 0
    base = json.loads(capsys.readouterr().out)
    assert main([*args, "--inter-bw", "400", "--latency", "1", "--gpu", "A100"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["hardware"]["inter_bw"] == 400e9 and fast["hardware"]["latency"] == pytest.approx(1e-6)
    assert fast["hardware"]["gemm_flops"] == timemodel.GPUS["A100"].gemm_flops
    assert fast["time_ms"] != base["time_ms"]
