"""strategy="auto" decided by the cost model (megabatch.cost.choose): the pick at the seeds' configurations
(CLIP, 32,768 global, D = 512, bfloat16, H200, 8 a node: 64 and 256 ranks -> the model's fastest, gather), where
memory forces another (1M global under a tight budget: hierarchical or ring), the choice visible with its
reason and the same in `megabatch plan` (one code path), the spec keeping "auto" until the call, the run-time
probes (profile from a device name, free memory on CPU) and the compiled backward's rebuild. Pure arithmetic
and host code: no process group, well under a second. (The decision across real ranks: test_distributed.py's
test_auto_is_the_cost_models_pick.)
"""
from __future__ import annotations

import json

import pytest
import torch

from megabatch import cost, plan, strategies
from megabatch.cli import main
from megabatch.strategies import auto

H200 = cost.GPUS["H200"]


def _clip(world: int, batch: int) -> cost.Shape:
    return cost.shape_of("clip", "ring", "triton", world, batch, batch, 512, "bfloat16", "cuda", False)


@pytest.mark.parametrize("world", [64, 256])
def test_the_seeds_configurations_pick_the_models_fastest(world):
    c = cost.choose(_clip(world, 32768), H200, 80 * 2**30, ranks_per_node=8)
    times = {k.strategy: k.time_s for k in c.candidates}
    assert set(times) == {"ring", "gather", "hierarchical"} and all(k.fits for k in c.candidates)
    assert c.strategy == min(times, key=times.get) == "gather"
    assert c.reason.startswith("gather: the fastest predicted on H200 rates") and "ring" in c.reason
    # the gathered features are tens of MiB here, not a B x B matrix
    assert next(k for k in c.candidates if k.strategy == "gather").peak_bytes < 200 * 2**20


def test_a_tight_budget_at_1m_forces_hierarchical_or_ring():
    siglip = cost.shape_of("siglip", "ring", "triton", 256, 2**20, 2**20, 512, "bfloat16", "cuda", False)
    free = cost.choose(siglip, H200, None, ranks_per_node=8)
    tight = cost.choose(siglip, H200, 2**30, ranks_per_node=8)  # gather's 3 GiB does not fit
    assert free.strategy == "gather" and tight.strategy == "hierarchical" and tight.ranks_per_node == 8
    assert "gather's peak 3.07 GiB over the memory budget of 1.00 GiB" in tight.reason
    nodeless = cost.choose(siglip, H200, 2**30)  # R unknown: hierarchical is no candidate
    assert nodeless.strategy == "ring" and [k.strategy for k in nodeless.candidates] == ["ring", "gather"]
    none = cost.choose(siglip, H200, 1, ranks_per_node=8)  # nothing fits: the least peak
    assert none.strategy == "ring" and none.reason.startswith("ring: no candidate's peak fits")
    assert cost.choose(_clip(1, 4096), H200).strategy == "local"


def test_plan_prints_the_functions_answer(capsys):
    args = ["plan", "--loss", "siglip", "--world", "256", "--batch", "1048576", "--dim", "512", "--gpu-mem", "3GiB"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mine = plan.auto_choice("siglip", 256, 1048576, 512, "bfloat16", gpu_mem=3 * 2**30)
    assert out["strategy"] == out["auto"]["strategy"] == mine.strategy == "hierarchical"
    assert out["auto"]["reason"] == mine.reason and f"auto picks {mine.reason}" in text
    assert " <-" in next(line for line in text.splitlines() if line.startswith("hierarchical triton"))
    # the budget is what --gpu-mem leaves beside the features: a pick fits exactly where the table says so
    fits = {(o["strategy"], o["backend"]): o["fits"] for o in out["options"]}
    assert {k["strategy"]: k["fits"] for k in out["auto"]["candidates"]} == \
        {s: fits[(s, "triton")] for s in ("ring", "gather", "hierarchical")}


def test_the_spec_keeps_auto_until_the_call():
    assert strategies.make_spec("auto", None) == strategies.StrategySpec("local", 0, None)  # one process
    assert strategies.planned("auto", 1) == "local" and strategies.planned("auto", 8) == "auto"
    assert strategies.planned("ring", 8) == "ring" and strategies.planned("auto", 8) == "auto"
    assert strategies.planned("auto", 1) == "local"
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        strategies.make_spec("auto", None, memory_budget=0)


def test_from_layout_rebuilds_what_auto_chose():
    lay = strategies.Layout(None, 0, (3, 4), (3, 4), True, False, 0, "gather")
    assert strategies.from_layout("gather", lay).name == "gather"
    for code, name in enumerate(("gather", "ring", "hierarchical")):  # the compiled layout's row 2 round trip
        assert strategies.strategy_name(strategies.strategy_code(name)) == name and strategies.strategy_code(name) == code
    with pytest.raises(ValueError, match="needs a concrete strategy"):
        strategies.from_layout("auto", lay)


def test_the_run_time_probes():
    assert cost.profile_of("NVIDIA H200") == "H200" and cost.profile_of("NVIDIA A100-SXM4-80GB") == "A100"
    assert cost.profile_of("NVIDIA L4") == cost.DEFAULT_GPU == "H100" and cost.profile_of(None) == "CPU"
    assert cost.profile("CPU") is cost.CPU and cost.PROFILES[0] == "A100"  # ranks that differ: the slowest
    cpu = torch.device("cpu")
    assert auto.local_budget(12345, cpu) == 12345
    free = auto.local_budget(None, cpu)
    assert free == -1 or free > 2**20  # MemAvailable, or unknown (no /proc/meminfo)
    assert auto.hardware_code(cpu) == cost.PROFILES.index("CPU")
