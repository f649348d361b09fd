"""Hardware profiles: schema, TOML round trip, strict errors, shipped profiles and plans made from them."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from hybridmoe.cli import main
from hybridmoe.errors import ConfigError
from hybridmoe.hardware import profile as P
from hybridmoe.hardware.probe import probe_machine
from hybridmoe.offload.plan import GiB, PlanOptions, footprint_from_config, make_plan
from hybridmoe.offload.scheduler import CostModel

V3 = json.loads((Path(__file__).parent.parent / "cli" / "data" / "deepseek_v3_config.json").read_text())
SHIPPED = ("rtx6000ada-x2", "rtx6000ada-x4", "cpu-only", "h100-x1")


@pytest.fixture(scope="module")
def r1_q4km():
    """DeepSeek-R1 at Q4_K_M: attention/dense at Q8_0 (8.5 bits), experts at Q4_K (4.5 bits)."""
    return footprint_from_config(V3, weight_bytes=8.5 / 8, expert_bytes=4.5 / 8)


def test_profile_of_this_machine_round_trips(tmp_path):
    spec = P.spec_from_machine(probe_machine(tmp_path, measure_disk=False))
    prof = P.Profile(P.Meta("here", "measured", created="2026-01-01", how="test"), spec,
                     CostModel(cpu_bytes_per_s=12.3456e9, launch_s=17e-6), P.PlanSpec(context=8192, cpu_threads=3))
    path = P.save(prof, tmp_path / "here.toml", header=["a header"], comments={"cost": "rates"})
    text = path.read_text()
    assert text.startswith("# a header") and "# rates\n[cost]" in text
    back = P.load(path)
    assert back.hardware == prof.hardware and back.plan == prof.plan and back.profile == prof.profile
    assert back.cost.cpu_bytes_per_s == pytest.approx(12.3456e9) and back.cost.launch_s == pytest.approx(17e-6)
    assert P.dumps(back) == P.dumps(P.loads(P.dumps(back)))  # stable after one trip
    hw = back.hardware_for_plan()
    assert hw.cpu_cores == spec.cpu_cores and len(hw.gpus) == len(spec.gpus)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_say_where_figures_come_from(name):
    path = P.find(name)
    prof = P.load(path)
    assert prof.profile.name == name
    text = path.read_text()
    if name.startswith("rtx6000ada"):
        assert prof.profile.source == "datasheet" and "datasheet" in text.splitlines()[1].lower()
        assert all(g.memory_gib == pytest.approx(48, abs=0.1) and g.pcie_gen == 4 for g in prof.hardware.gpus)
        assert prof.cost.gpu_bytes_per_s == 960e9 and prof.cost.h2d_bytes_per_s == 25e9
    if name == "h100-x1":
        assert prof.profile.source == "measured" and prof.profile.how
    assert len(prof.hardware.gpus) == {"rtx6000ada-x2": 2, "rtx6000ada-x4": 4, "cpu-only": 0, "h100-x1": 1}[name]


@pytest.mark.parametrize("text, key", [
    ("[profile\nname = 1", "not valid TOML"),
    ('[project]\nname = "foo"\n[build-system]\nrequires = []\n', "'project'"),
    ('[tool.black]\nline-length = 100\n', "'tool'"),
    ('[profile]\nname = "x"\nsource = "datasheet"\n', "[hardware]"),
])
def test_corrupt_or_foreign_toml_names_the_problem_and_file(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        P.load(path)
    assert str(path) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize("old, new, key", [
    ("cpu_cores = 32", 'cpu_cores = "many"', "hardware.cpu_cores"),
    ("cpu_cores = 32", "cpu_cores = 32.5", "hardware.cpu_cores"),
    ("cpu_bytes_per_s = 120e9", "cpu_bytes_per_s = -1.0", "cpu_bytes_per_s"),
    ("cpu_bytes_per_s = 120e9", "cpu_bytes_per_s = 120e9\nturbo = true", "cost.turbo"),
    ('source = "datasheet"', 'source = "rumour"', "profile.source"),
    ("memory_gib = 47.99", "memory_gib = [48]", "hardware.gpus[0].memory_gib"),
    ("pcie_gen = 4", "pcie_gen = 4\nnvlink = true", "hardware.gpus[0].nvlink"),
    ('experts_tier = "pinned"', 'experts_tier = "swap"', "plan.experts_tier"),
    ("ram_total_gib = 512.0\n", "", "hardware.ram_total_gib"),
])
def test_bad_key_is_named(tmp_path, old, new, key):
    text = P.find("rtx6000ada-x2").read_text()
    assert old in text
    path = tmp_path / "edited.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        P.load(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_find_by_name_or_path_and_list_what_exists(tmp_path):
    assert P.find("cpu-only") == P.available()["cpu-only"]
    with pytest.raises(ConfigError, match="rtx6000ada-x2"):
        P.find("gtx-970")
    with pytest.raises(ConfigError, match="no such file"):
        P.find(str(tmp_path / "missing.toml"))


def test_two_ada_gpus_split_layers_and_cache_the_rest(r1_q4km):
    prof = P.load(P.find("rtx6000ada-x2"))
    hw = prof.hardware_for_plan()
    plan = make_plan(r1_q4km, hw, prof.plan_options())
    assert plan.fits and len(plan.devices) == 2
    a, b = plan.devices
    assert a.layers[0] == 0 and b.layers[-1] == 60 and a.layers[-1] + 1 == b.layers[0]  # attention/dense on both
    for d, gpu in zip(plan.devices, hw.gpus):
        used = d.bytes_weights + d.bytes_kv + d.bytes_slots + d.bytes_prefill  # prefill: staging, activations
        assert d.expert_slots > 1000 and used <= gpu.bytes_free  # the rest of VRAM is expert cache
        assert used >= 0.85 * gpu.bytes_free
    assert plan.experts["tier"] == "pinned"  # 343 GiB of experts, 512 GiB of RAM
    auto = PlanOptions(context=prof.plan.context)  # tier chosen from RAM, not the profile's tuned choice
    assert make_plan(r1_q4km, hw, auto).experts["tier"] == "pinned"
    small = replace(hw, ram_total=384 * GiB, ram_available=376 * GiB)
    assert make_plan(r1_q4km, small, auto).experts["tier"] == "mmap"


def test_four_ada_gpus_cache_more(r1_q4km):
    two = P.load(P.find("rtx6000ada-x2"))
    four = P.load(P.find("rtx6000ada-x4"))
    p2 = make_plan(r1_q4km, two.hardware_for_plan(), two.plan_options())
    p4 = make_plan(r1_q4km, four.hardware_for_plan(), four.plan_options())
    assert p4.fits and len(p4.devices) == 4 and p4.experts["tier"] == "pinned"
    assert p4.experts["cache_slots_total"] > 2 * p2.experts["cache_slots_total"]
    assert [len(d.layers) > 0 for d in p4.devices] == [True] * 4


def test_cli_plan_with_profile(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3))
    assert main(["plan", str(tmp_path), "--profile", "rtx6000ada-x4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["devices"]) == 4 and all("RTX 6000 Ada" in d["name"] for d in plan["devices"])
    assert main(["plan", str(tmp_path), "--profile", "rtx6000ada-x2", "--ram", "64GiB"]) in (0, 3)
    assert "mmap" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[tool.poetry]\n")
    assert main(["plan", str(tmp_path), "--profile", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "'tool'" in err


def test_auto_profile_matches_this_machine():
    prof = P.auto(measure_s=2, progress=False)
    here = probe_machine()
    assert len(prof.hardware.gpus) == len(here.gpus)
    assert prof.hardware.cpu_cores == here.cpu.cores  # hardware probed
    if not here.gpus:
        assert prof.profile.name == "cpu-only"  # rates from the matching shipped profile
    P.loads(P.dumps(prof))
