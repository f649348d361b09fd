"""The auto-tuner's speed model and choices, `hybridmoe tune`, and the microbenchmarks behind it."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from hybridmoe.cli import main
from hybridmoe.errors import ConfigError
from hybridmoe.hardware import microbench as MB
from hybridmoe.hardware import profile as P
from hybridmoe.hardware.tune import TuneOptions, expert_flops, footprint_for, predict, tune
from hybridmoe.offload.plan import GPU, GiB, Hardware, PlanOptions, make_plan
from hybridmoe.offload.scheduler import CostModel

DATA = Path(__file__).parent.parent / "cli" / "data" / "deepseek_v3_config.json"
V3 = json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def r1():
    fp, cfg = footprint_for(DATA, quant="q4_k_m")
    return fp, expert_flops(cfg)


def ada(n: int, ram_gib: int = 512) -> tuple[Hardware, CostModel]:
    prof = P.load(P.find(f"rtx6000ada-x{2 if n == 2 else 4}"))
    hw = prof.hardware_for_plan()
    return replace(hw, gpus=hw.gpus[:n], ram_total=ram_gib * GiB, ram_available=(ram_gib - 12) * GiB), prof.cost


def test_more_cache_more_speed_and_disk_hurts(r1):
    fp, flops = r1
    hw, cost = ada(2)
    opts = TuneOptions()
    speeds = []
    for slots in (0, 200, 800, None):
        plan = make_plan(fp, hw, PlanOptions(max_slots=slots))
        speeds.append(predict(fp, hw, cost, plan, "pinned", 0, cost.cpu_bytes_per_s, flops, opts).tok_s)
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1]
    small, _ = ada(2, ram_gib=256)
    plan = make_plan(fp, small, PlanOptions())
    mmap = predict(fp, small, cost, plan, "mmap", 0, cost.cpu_bytes_per_s, flops, opts)
    assert mmap.disk_s > 0 and mmap.tok_s < speeds[-1] / 2


def test_tuner_choices_for_r1_on_two_and_four_adas(r1):
    fp, flops = r1
    two = tune(fp, *ada(2), flops, 163840)
    four = tune(fp, *ada(4), flops, 163840)
    for res, n in ((two, 2), (four, 4)):
        ch = res.choice
        assert ch.tier == "pinned" and len(ch.plan.devices) == n and ch.plan.fits
        assert ch.prediction.tok_s > 0 and ch.plan.context >= 4096
        assert [r[0] for r in res.rows] == ["layers per GPU", "expert cache slots", "experts tier", "CPU threads",
                                            "prefetch margin", "context", "batch", "predicted decode"]
    assert four.choice.prediction.tok_s > two.choice.prediction.tok_s
    assert four.choice.plan.experts["cache_slots_total"] > two.choice.plan.experts["cache_slots_total"]
    low_ram = tune(fp, *ada(2, ram_gib=256), flops, 163840)
    assert low_ram.choice.tier == "mmap" and "disk" in low_ram.rows[2][2]
    fixed = tune(fp, *ada(2), flops, 163840, TuneOptions(context=8192, batch=1))
    assert fixed.choice.plan.context == 8192 and "--ctx" in fixed.rows[5][2]


def test_measured_thread_curve_picks_fewest_threads_near_the_peak(r1):
    fp, flops = r1
    hw, cost = ada(2)
    curve = {4: 40e9, 8: 70e9, 16: 96e9, 31: 100e9, 32: 99e9}
    res = tune(fp, hw, cost, flops, 163840, TuneOptions(cpu_curve=curve))
    assert res.choice.threads == 16


def test_nothing_fits_is_a_clear_error(r1):
    fp, flops = r1
    hw = Hardware((GPU("small", 8 * GiB, 7 * GiB),), 512 * GiB, 500 * GiB, 8)
    with pytest.raises(ConfigError, match="no plan fits"):
        tune(fp, hw, CostModel(), flops, 163840)


def test_cpu_only_machine():
    tiny = dict(V3, num_hidden_layers=3, n_routed_experts=16, moe_intermediate_size=64, hidden_size=256,
                intermediate_size=512, vocab_size=1000, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32)
    from hybridmoe.offload.plan import footprint_from_config
    fp = footprint_from_config(tiny)
    res = tune(fp, Hardware((), 32 * GiB, 30 * GiB, 8), CostModel(), expert_flops(tiny), 4096)
    assert res.choice.tier == "mmap" and res.choice.threads == 8 and res.choice.margin == 0
    assert res.rows[0][1] == "CPU"


def test_microbench_measures_positive_rates_within_budget(tmp_path, capsys):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * (2 << 20))
    s = MB.BenchSettings(MB.ExpertDims(128, 64), "float32", budget_s=2, prefill_tokens=16, thread_counts=(1,),
                         disk_path=str(f), rotation_bytes=1 << 20)
    m = MB.run(s)
    assert m.cpu_bytes_per_s > 0 and m.cpu_flops > 0 and m.cpu_by_threads.keys() == {1}
    assert any("not multiples of 256" in n for n in m.notes)
    assert m.disk_read_bytes_per_s is None or m.disk_read_bytes_per_s > 0
    err = capsys.readouterr().err
    assert "CPU expert, 1 token" in err and "disk read" in err
    cost = m.cost_model(CostModel(gpu_flops=123e12))
    assert cost.cpu_bytes_per_s == m.cpu_bytes_per_s
    assert cost.gpu_flops == (m.gpu_flops or 123e12)  # measured where there is a GPU, else the base's
    with pytest.raises(ValueError, match="dtype"):
        MB.BenchSettings(dtype="int3")


def test_quantized_cpu_kernel_rate_when_the_kernels_import():
    notes = []
    if not MB.quant_kernels_usable(MB.ExpertDims(256, 256), notes):
        pytest.skip(notes[0])
    m = MB.Measurements()
    MB.bench_cpu_quant(MB.BenchSettings(MB.ExpertDims(256, 256), rotation_bytes=1 << 20, progress=False), m, 0.5)
    assert m.cpu_quant_bytes_per_s > 0, m.notes
    assert m.cost_model(quantized=True).cpu_bytes_per_s == m.cpu_quant_bytes_per_s


def test_cli_tune_quick_on_a_tiny_model_writes_a_loadable_profile(capsys, tiny_models, tmp_path):
    out = tmp_path / "profiles" / "tiny.toml"
    assert main(["tune", str(tiny_models("deepseek_v3")), "--quick", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted decode" in text and f"wrote {out}" in text
    prof = P.load(out)
    assert prof.profile.name == "tiny" and prof.plan.predicted_tok_s > 0 and prof.plan.context >= 1
    assert prof.hardware.cpu_cores >= 1
    assert main(["plan", str(tiny_models("deepseek_v3")), "--profile", str(out), "--json"]) == 0


def test_cli_tune_without_a_model_and_with_a_described_machine(capsys, tmp_path):
    out = tmp_path / "machine.toml"
    assert main(["tune", "--quick", "-o", str(out)]) == 0
    assert P.load(out).plan.model == ""
    out4 = tmp_path / "ada4.toml"
    assert main(["tune", str(DATA), "--profile", "rtx6000ada-x4", "--quant", "q4_k_m", "-o", str(out4)]) == 0
    prof = P.load(out4)
    assert len(prof.hardware.gpus) == 4 and prof.profile.source == "datasheet"
    assert len(prof.plan.expert_cache_slots) == 4 and prof.plan.experts_tier == "pinned"
    assert main(["tune", str(DATA), "--quick", "--quant", "q9_z"]) == 1
    assert "q4_k_m" in capsys.readouterr().err


def test_the_tuner_plans_one_sequence():
    """Generation runs one sequence: a plan for a larger batch would only budget KV cache for rows that never run
    (this small model on an H100 used to get batch 8)."""
    tiny = dict(V3, num_hidden_layers=4, n_routed_experts=16, moe_intermediate_size=64, hidden_size=256,
                intermediate_size=512, vocab_size=1000, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32)
    from hybridmoe.offload.plan import footprint_from_config
    prof = P.load(P.find("h100-x1"))
    res = tune(footprint_from_config(tiny), prof.hardware_for_plan(), prof.cost, expert_flops(tiny), 4096)
    assert res.choice.prediction.batch == 1 and res.choice.plan.batch == 1
    assert dict((r[0], r[1]) for r in res.rows)["batch"] == "1"
