"""The time model (src/megabatch/timemodel.py, `megabatch plan --time`): the flat ring's transfer is hidden
exactly when a step's compute covers it (the brief's arithmetic: b ~ 15,800 rows a rank over one NDR NIC at
790 TFLOP/s), every term is carried by --json, `auto` follows the model only where plan knows the layout,
and W from 8 to 1,024 gives a finite time for every option; the node-aware ring (hierarchical, modelled from its
design) has hand-computed terms, is the flat ring with one rank a node and sends nothing over InfiniBand within
one node, and is a candidate only where the world is whole nodes. Pure arithmetic: well under a second.
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
    from megabatch.cost import sent_bytes as _sent
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
    assert {o["strategy"] for o in out["options"]} == {"ring", "gather", "hierarchical"}  # 8 a node divides W
    for o in out["options"]:
        assert math.isfinite(o["time_ms"]) and o["time_ms"] > 0
        terms = {"compute_s", "transfer_s", "latency_s", "hidden_s", "bytes_intra", "bytes_inter", "messages"}
        assert all(math.isfinite(o["time_terms"][k]) for k in terms)
        assert terms <= set(o["time_terms"])
    # auto: the fastest strategy on the backend the losses pick (triton on cuda), its candidates the options' times
    mine = [o for o in out["options"] if o["backend"] == out["backend"] == "triton"]
    assert out["time_ms"] == min(o["time_ms"] for o in mine) and out["strategy"] == out["auto"]["strategy"]
    assert {c["strategy"]: 1e3 * c["time_s"] for c in out["auto"]["candidates"]} == \
        {o["strategy"]: pytest.approx(o["time_ms"], rel=1e-12) for o in mine}
    assert out["hardware"]["name"] == "H200" and "predicted" in out["hardware"]["status"]


def test_auto_follows_the_model_with_or_without_time(capsys):
    args = ["plan", "--loss", "clip", "--world", "256", "--batch", "32768", "--dim", "512", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "gather"  # the library's auto: the model's pick
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


TOY = timemodel.Hardware("toy", gemm_flops=1e12, intra_bw=1e9, inter_bw=1e8, latency=1e-6, ranks_per_node=2,
                         kernel_floor=0.0)


def _hier(loss: str, w: int, rows: int, hw: timemodel.Hardware, strategy: str = "hierarchical", ids: bool = False,
          dim: int = 4) -> dict:
    s = shape_of(loss, strategy, "torch", w, w * rows, w * rows, dim, "float32", "cuda", ids, hw.ranks_per_node)
    return timemodel.step_time(s, hw, ratio=1.0)


def test_hierarchical_terms_by_hand():
    """SigLIP, W = 4 ranks, R = 2 a node, M = 2 nodes, 8 rows a rank, D = 4, float32: a slice and its accumulator
    are 8 * 4 * 4 = 128 B each. Two steps: step 0 sends the slice to the next node, step 1 the accumulator,
    then it hops home (1.28 us each at 100 MB/s); each step all-gathers one slice and reduce-scatters one
    accumulator over NVLink (0.256 us at 1 GB/s) around a visit of 8 x 16 (3 * 2 * 8 * 16 * 4 FLOP = 3.072 ns
    at 1 TFLOP/s). The layout exchange: 3 * 112 B, 168 of them over the NICs (1.68e-6 s), 2 * log2(4) hops."""
    t = _hier("siglip", 4, 8, TOY)
    visit, local, inter, layout = 3072 / 1e12, 256 / 1e9, 128 / 1e8, 168 / 1e8
    assert t["compute_s"] == pytest.approx(2 * visit)
    assert t["transfer_s"] == pytest.approx(layout + 2 * (inter + local) + inter)
    assert t["hidden_s"] == pytest.approx(2 * min(inter, local + visit))
    # layout 4 hops; a step: 1 inter hop + all-gather and reduce-scatter 2 * ceil(log2 2) each; the hop home
    assert t["latency_s"] == pytest.approx((4 + 2 * (1 + 2 + 2) + 1) * 1e-6)
    # at overlap 1: max(inter, local + visit) a step, the hop home, the layout, the hops
    assert t["time_s"] == pytest.approx(2 * inter + inter + layout + 15e-6) and t["time_s"] == pytest.approx(20.52e-6)
    assert (t["bytes_inter"], t["bytes_intra"]) == (168 + 3 * 128, 168 + 2 * 256)
    assert t["messages"] == 1 + 3 + 3 + 1  # layout; a step: a p2p, an all-gather, a reduce-scatter; home
    no_overlap = timemodel.step_time(shape_of("siglip", "hierarchical", "torch", 4, 32, 32, 4, "float32", "cuda",
                                              False, 2), replace(TOY, overlap=0.0), ratio=1.0)
    assert no_overlap["time_s"] == pytest.approx(t["time_s"] + t["hidden_s"])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("ids", [False, True])
def test_hierarchical_with_one_rank_a_node_is_the_flat_ring(loss, ids):
    hw = replace(TOY, ranks_per_node=1)
    for w in (2, 5):
        assert _hier(loss, w, 64, hw, ids=ids) == _hier(loss, w, 64, hw, "ring", ids)  # every term, exactly


def test_hierarchical_within_one_node_sends_nothing_over_infiniband():
    hw = replace(timemodel.GPUS["H200"], ranks_per_node=8)
    one = _hier("siglip", 8, 512, hw, dim=512)
    gather = _hier("siglip", 8, 512, hw, "gather", dim=512)
    assert one["bytes_inter"] == 0 and one["bytes_intra"] > 0
    assert one["compute_s"] == pytest.approx(gather["compute_s"])  # M = 1: one visit of all N texts, as gather
    assert one["latency_s"] == pytest.approx((2 * 3 + 2 * 2 * 3) * hw.latency)  # layout; all-gather + reduce
    two = _hier("siglip", 16, 512, hw, dim=512)
    assert two["bytes_inter"] > 0 and two["compute_s"] == pytest.approx(2 * one["compute_s"])  # M = 2 visits


def test_hierarchical_bytes_are_the_planners():
    from megabatch.cost import sent_bytes as _sent
    for loss in ("clip", "siglip"):
        for ids in (False, True):
            for w, r in ((2, 2), (4, 2), (16, 8), (6, 3)):
                s = shape_of(loss, "hierarchical", "torch", w, w * 64, w * 64, 32, "bfloat16", "cuda", ids, r)
                t = timemodel.step_time(s, replace(TOY, ranks_per_node=r))
                assert round(t["bytes_intra"] + t["bytes_inter"]) == _sent(s), (loss, ids, w, r)  # 1/R shares
    with pytest.raises(ValueError, match="ranks per node"):
        timemodel.step_time(shape_of("clip", "hierarchical", "torch", 4, 64, 64, 8, "float32", "cuda", False, 2),
                            timemodel.GPUS["H200"])


def test_hierarchical_is_planned_for_whole_nodes_only(capsys):
    from megabatch import plan
    args = ["plan", "--loss", "siglip", "--world", "1024", "--batch", "1048576", "--dim", "512", "--json"]
    assert main(args) == 0
    rows = {(o["strategy"], o["backend"]): o for o in json.loads(capsys.readouterr().out)["options"]}
    # memory O(R*b*D): between the ring's one block and gather's whole batch
    for be in ("torch", "triton"):
        assert rows[("ring", be)]["peak_bytes"] < rows[("hierarchical", be)]["peak_bytes"] \
            < rows[("gather", be)]["peak_bytes"] / 10
    assert main([*args[:4], "12", *args[5:]]) == 0  # 12 ranks, 8 a node: not a candidate
    assert "hierarchical" not in {o["strategy"] for o in json.loads(capsys.readouterr().out)["options"]}
    assert main([*args[:4], "12", *args[5:], "--ranks-per-node", "4", "--strategy", "hierarchical"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "hierarchical"
    with pytest.raises(SystemExit) as e:
        main([*args[:4], "12", *args[5:], "--strategy", "hierarchical"])
    assert e.value.code == 2 and "--ranks-per-node (8)" in capsys.readouterr().err
    # what auto picks for given sizes, as plan --time prints it; hierarchical where gather does not fit
    assert main([*args, "--time"]) == 0
    cli = json.loads(capsys.readouterr().out)
    best = plan.auto_choice("siglip", 1024, 1048576, 512, "bfloat16", hw=timemodel.GPUS["H200"])
    assert (best.strategy, cli["backend"]) == (cli["strategy"], "triton") == ("gather", "triton")
    tight = plan.auto_choice("siglip", 256, 1048576, 512, "bfloat16", hw=timemodel.GPUS["H200"], gpu_mem=2**30)
    assert tight.strategy == "hierarchical" and tight.ranks_per_node == 8


# benchmarks/time_model_check.py --hierarchical (gloo, 8 images and texts a rank, D = 32, float32, torch backend):
# (loss, ids, W, R) -> (forward, backward) as (bytes, messages) that _comm.count_bytes() counted on every rank,
# with the 12-column layout row of then: the forward's layout exchange now sends 2 int64 more to each peer
LAYOUT_GREW = 16
GLOO_COUNTED = {
    ("clip", False, 4, 2): ((4000, 10), (9408, 10)), ("clip", True, 4, 2): ((4984, 18), (9792, 16)),
    ("siglip", False, 4, 2): ((9504, 8), (0, 0)), ("siglip", True, 4, 2): ((9696, 11), (0, 0)),
    ("clip", False, 6, 2): ((6560, 15), (14656, 16)), ("clip", True, 6, 2): ((8058, 27), (15296, 26)),
    ("siglip", False, 6, 2): ((14816, 12), (0, 0)), ("siglip", True, 6, 2): ((15136, 17), (0, 0)),
    ("clip", False, 6, 3): ((6752, 10), (15680, 10)), ("clip", True, 6, 3): ((8378, 18), (16320, 16)),
    ("siglip", False, 6, 3): ((15840, 8), (0, 0)), ("siglip", True, 6, 3): ((16160, 11), (0, 0)),
}


def test_hierarchical_counts_are_what_gloo_counted():
    """The model's bytes and messages for a CPU shape are what the strategy sent on gloo, per step and (CLIP's
    backward) per pass. Written from the design, the model had CLIP's column log-sum-exp reduced as one
    reduce-scatter of 8 B a row (the strategy all-reduces twice: max, then the sum of exp; a message more a
    step, 4x the bytes) and every node sum as a reduce-scatter (gloo all-reduces: twice the bytes); on CUDA
    the sums stay reduce-scatters (NCCL), which no machine here can count."""
    from megabatch.cost.terms import hierarchical_passes
    for (loss, ids, w, r), (fwd, bwd) in GLOO_COUNTED.items():
        s = shape_of(loss, "hierarchical", "torch", w, 8 * w, 8 * w, 32, "float32", "cpu", ids, r)
        t = timemodel.step_time(s, replace(TOY, ranks_per_node=r))
        counted = fwd[0] + LAYOUT_GREW * (w - 1) + bwd[0]
        assert (round(t["bytes_intra"] + t["bytes_inter"]), t["messages"]) == (counted, fwd[1] + bwd[1])
        assert hierarchical_passes(s)[1:] == ([bwd] if loss == "clip" else [])
        nccl = timemodel.step_time(replace(s, device="cuda"), replace(TOY, ranks_per_node=r))
        # NCCL reduce-scatters the node sums: slices of the gradient (and CLIP's positive sums) a step,
        # where gloo's all-reduce sends 2(R-1)
        halved = (w // r) * (r - 1) * 8 * (32 * 4 + (16 if loss == "clip" and ids else 0))
        assert round(t["bytes_intra"] + t["bytes_inter"]) - round(nccl["bytes_intra"] + nccl["bytes_inter"]) == halved
        assert nccl["messages"] == t["messages"]
