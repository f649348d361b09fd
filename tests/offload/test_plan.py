"""Placement plans from metadata alone."""
import json
from pathlib import Path

import pytest

from hybridmoe.cli import main
from hybridmoe.offload.plan import GPU, GiB, Hardware, PlanOptions, footprint_from_config, make_plan

V3 = json.loads((Path(__file__).parent.parent / "cli" / "data" / "deepseek_v3_config.json").read_text())


def rtx(n: int) -> tuple[GPU, ...]:
    return tuple(GPU("RTX 6000 Ada", 48 * GiB, 47 * GiB) for _ in range(n))


@pytest.fixture(scope="module")
def q4_footprint():
    """DeepSeek-V3 with attention/dense at 8.5 bits and experts at 4.5 bits per weight (Q8_0 / Q4_K)."""
    return footprint_from_config(V3, weight_bytes=8.5 / 8, expert_bytes=4.5 / 8)


def test_two_gpus_contiguous_balanced_stages(q4_footprint):
    plan = make_plan(q4_footprint, Hardware(rtx(2), 512 * GiB, 500 * GiB, 32), PlanOptions(context=8192))
    assert plan.fits
    layers = [d.layers for d in plan.devices]
    assert layers[0][0] == 0 and layers[-1][-1] == 60 and layers[0][-1] + 1 == layers[1][0]
    w = [d.bytes_weights for d in plan.devices]
    assert abs(w[0] - w[1]) / max(w) < 0.15
    for d in plan.devices:
        assert d.bytes_weights + d.bytes_kv + d.bytes_slots <= 47 * GiB
        assert d.expert_slots > 0
    assert plan.experts["tier"] == "pinned"  # 343 GiB of experts fit in 500 GiB
    assert plan.experts["cache_slots_total"] == sum(d.expert_slots for d in plan.devices)


def test_small_ram_switches_to_mmap_and_four_gpus_cache_more(q4_footprint):
    two = make_plan(q4_footprint, Hardware(rtx(2), 256 * GiB, 250 * GiB, 32))
    four = make_plan(q4_footprint, Hardware(rtx(4), 256 * GiB, 250 * GiB, 32))
    assert two.experts["tier"] == "mmap" and two.fits
    assert four.experts["cache_slots_total"] > 2 * two.experts["cache_slots_total"]


def test_does_not_fit_says_by_how_much_and_what_helps(q4_footprint):
    plan = make_plan(q4_footprint, Hardware((GPU("small", 16 * GiB, 15 * GiB),), 512 * GiB, 500 * GiB, 8),
                     PlanOptions(context=163840))
    assert not plan.fits
    assert "short" in plan.problems[0] and "--ctx" in plan.problems[0]


def test_everything_fits_caches_every_expert():
    tiny = dict(V3, num_hidden_layers=4, n_routed_experts=16, moe_intermediate_size=64, hidden_size=256,
                intermediate_size=512, vocab_size=1000, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32)
    fp = footprint_from_config(tiny)
    plan = make_plan(fp, Hardware(rtx(1), 64 * GiB, 60 * GiB, 8))
    assert plan.devices[0].expert_slots == sum(fp.experts_per_layer)
    assert plan.prefetch_margin == 0


def test_cli_plan_json_and_exit_code(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3))
    assert main(["plan", str(tmp_path), "--gpus", "2x48GiB", "--ram", "1024GiB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert {"fits", "devices", "experts", "cpu_threads"} <= p.keys()
    assert {"name", "bytes_total", "bytes_weights", "bytes_kv", "expert_slots", "layers"} <= p["devices"][0].keys()
    assert {"tier", "bytes", "cache_slots_total"} <= p["experts"].keys()
    assert main(["plan", str(tmp_path), "--gpus", "1x8GiB", "--ram", "64GiB"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(tmp_path), "--gpus", "two"]) == 1


def test_without_a_gpu_the_other_weights_and_kv_must_fit_in_ram():
    """DeepSeek-V3 on a 22 GiB machine without a GPU: the experts may stream from disk, but attention, dense and
    shared layers (about 35 GiB at bf16) and the KV cache live in RAM, so it does not fit."""
    fp = footprint_from_config(V3, weight_bytes=2, expert_bytes=2)
    plan = make_plan(fp, Hardware((), 24 * GiB, 22 * GiB, 2), PlanOptions(experts_tier="mmap"))
    assert not plan.fits
    assert "RAM" in plan.problems[0] and "short" in plan.problems[0]
    small = dict(V3, num_hidden_layers=4, n_routed_experts=16, moe_intermediate_size=64, hidden_size=256,
                 intermediate_size=512, vocab_size=1000, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32)
    fits = make_plan(footprint_from_config(small), Hardware((), 24 * GiB, 22 * GiB, 2))
    assert fits.fits
    # a long context alone can be what does not fit, and the message says so
    big_kv = make_plan(footprint_from_config(small), Hardware((), 24 * GiB, 1 * GiB, 2), PlanOptions(context=10**7))
    assert not big_kv.fits and "--ctx" in big_kv.problems[0]


def test_cli_plan_without_a_gpu_says_does_not_fit(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3))
    assert main(["plan", str(tmp_path), "--gpus", "none", "--ram", "22GiB"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
