"""The app's plain-Python parts: monitor accumulation, heatmap binning, model facts, machine probe."""
import pytest

import hybridmoe
from hybridmoe import Stats
from hybridmoe_tui.heatmap import bins, heat_grid
from hybridmoe_tui.info import model_facts, param_counts, placement
from hybridmoe_tui.probe import SystemProbe
from hybridmoe_tui.stats import MonitorState


def test_monitor_state_accumulates_counters_of_either_shape():
    s = MonitorState()
    assert s.hit_rate is None and s.recall is None and s.h2d_gb_s is None
    s.push(Stats("prefill", 0, 10, 500.0, 0.0, 0.1, {"expert_tokens": {1: {0: 10, 3: 10}}}))
    s.push(Stats("decode", 1, 10, 500.0, 40.0, 0.15, {"expert_tokens": {1: {3: 1}}, "cache_hits": 3,
                                                      "cache_misses": 1, "bytes_copied": 1e8}))
    s.push(Stats("decode", 2, 10, 500.0, 30.0, 0.25, {"expert_tokens": {"1": {"5": 1}},
                                                      "cache_hits": {1: 2, 2: 2}, "cache_misses": {1: 0},
                                                      "prefetch_recall": {1: 0.5, 2: 1.0}, "bytes_copied": 1e8}))
    assert s.heat == {1: {0: 10, 3: 11, 5: 1}}
    assert s.hit_rate == pytest.approx(7 / 8) and s.recall == pytest.approx(0.75)
    assert s.h2d_gb_s == pytest.approx(2e8 / 0.15 / 1e9)
    assert s.prefill_tok_s == 500.0 and s.decode_tok_s == 30.0
    assert list(s.decode_rates) == [pytest.approx(10.0)]  # step 1 has no forward pass of its own: no rate
    s.reset_heat()
    assert s.heat == {}


def test_heatmap_bins_big_models_into_the_pane():
    assert [len(b) for b in bins(10, 4)] == [3, 3, 3, 1]
    assert bins(3, 10) == [range(0, 1), range(1, 2), range(2, 3)]
    layers = list(range(3, 61))  # DeepSeek-V3: 58 MoE layers of 256 experts
    heat = {3: {0: 5, 255: 1}, 60: {128: 2}}
    labels, grid, per_col, per_row = heat_grid(heat, layers, 256, width=30, height=10)
    assert len(grid) <= 10 and all(len(row) <= 30 - len(labels[0]) for row in grid)
    assert per_col * len(grid[0]) >= 256 and per_row * len(grid) >= 58
    assert sum(map(sum, grid)) == 8 and grid[0][0] == 5 and grid[-1][-1] == 0
    assert labels[0].strip() == "L3"


def test_model_facts_and_placement(engine):
    facts = dict(model_facts(engine))
    assert facts["type"] == engine.model_type and "MoE" in facts["layers"]
    total, active = param_counts(engine)
    assert 0 < active < total
    where = dict(placement(engine))
    assert where["routed experts"].startswith("cpu")


def test_placement_of_the_offload_engine(chat_model):
    engine = hybridmoe.load(chat_model, accelerator="cpu", expert_cache_slots=4)
    where = dict(placement(engine))
    assert where["expert cache"] == "cpu 0: 4 slots" and where["prefetch"] == "on"


def test_probe_reads_the_machine_without_a_gpu():
    probe = SystemProbe()
    r = probe.read()
    assert 0 < r.ram_used <= r.ram_total and r.cpu_percent >= 0
    assert r.gpus or r.gpu_note.startswith("no GPU")
    probe.close()
