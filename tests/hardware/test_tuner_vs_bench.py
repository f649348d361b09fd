"""bench/tuner_vs_bench.py end to end on a tiny GGUF, with the CPU standing in for the GPU; and the engine's
measured costs as the tuner and the profile use them."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hybridmoe.models.synthetic import twin_config, write_twin
from hybridmoe.hardware import profile as P

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tuner_vs_bench.py"
QWEN = dict(model_type="qwen3_moe", vocab_size=384, hidden_size=2048, intermediate_size=6144,
            moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
            rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf import GGMLQuantizationType as Q
    return write_twin(QWEN, 2, tmp_path_factory.mktemp("tvb") / "tiny.gguf", (Q.Q4_K, Q.Q4_K, Q.Q4_K))


def test_twin_keeps_the_routing_and_shrinks_the_dims():
    ds = dict(QWEN, model_type="deepseek_v3", n_routed_experts=256, n_group=8, topk_group=4, first_k_dense_replace=3,
              kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
              num_key_value_heads=128, num_attention_heads=128)
    t = twin_config(ds, 3)
    assert t["num_experts_per_tok"] == 8 and t["n_group"] == 8 and t["n_routed_experts"] % 8 == 0
    assert t["n_routed_experts"] // 8 * 4 >= 8  # the kept groups still hold top_k experts
    assert t["num_hidden_layers"] == 4 and t["first_k_dense_replace"] == 1
    assert t["hidden_size"] == 512 and t["kv_lora_rank"] == 256 and t["num_attention_heads"] == 4
    q = twin_config(QWEN, 1)
    assert q["num_key_value_heads"] == 1 and q["num_experts"] == 32 and q["num_hidden_layers"] == 1


def test_profile_engine_section_round_trips_and_old_profiles_load(tmp_path):
    text = P.find("h100-x1").read_text()
    before = tmp_path / "old.toml"  # as written before the [engine] section existed
    before.write_text(text[:text.index("[engine]")] if "[engine]" in text else text)
    old = P.load(before)
    assert not old.engine.measured
    old.engine = P.EngineCosts("cuda", "deepseek_v3", 2e-3, 3.5e-3, 40e-6, 15e9, 0.0, 16)
    path = P.save(old, tmp_path / "x.toml")
    back = P.load(path)
    assert back.engine == old.engine and "[engine]" in path.read_text()
    with pytest.raises(Exception, match="engine.bogus"):
        P.loads(path.read_text() + "\nbogus = 1\n", path)
    with pytest.raises(Exception, match="engine.accelerator"):
        P.loads(path.read_text().replace('accelerator = "cuda"', 'accelerator = "tpu"'), path)


def test_tuner_vs_bench_end_to_end_on_the_cpu(tiny_gguf, tmp_path, capsys, monkeypatch):
    from hybridmoe.engine.calibrate import measure
    eng = measure(tiny_gguf, "cpu", tokens=4, reps=1)
    assert eng.accelerator == "cpu" and eng.family == "qwen3_moe" and eng.threads >= 1
    assert eng.step_s + eng.moe_layer_s > 0 and min(eng.step_s, eng.moe_layer_s, eng.cpu_expert_s) >= 0
    prof = P.load(P.find("cpu-only"))
    prof.engine = eng
    prof.engine.cpu_expert_bytes_per_s, prof.engine.cpu_layer_bytes_per_s = 5e9, 10e9
    saved = P.save(prof, tmp_path / "machine.toml")

    spec = importlib.util.spec_from_file_location("tuner_vs_bench", SCRIPT)
    tvb = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tvb)  # its dataclasses look their module up
    spec.loader.exec_module(tvb)
    out = tmp_path / "r.json"
    assert tvb.main([str(tiny_gguf), "--profile", str(saved), "--accelerator", "cpu", "--tokens", "4", "--reps", "2",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| plan" in text and "measured/predicted" in text and "prediction of the tuned plan" in text
    res = json.loads(out.read_text())
    plans = res["plans"]
    assert len(plans) == 4 and plans[0]["name"] == "tuned"
    assert len({(p["slots"], p["margin"]) for p in plans}) == 4  # four different plans
    for p in plans:
        assert p["error"] == "" and p["predicted_tok_s"] > 0 and p["measured_tok_s"] > 0
        assert len(p["samples"]) == 2 and math.isfinite(p["ratio"]) and p["ratio"] > 0
    assert any(p["slots"] == 0 for p in plans) and any(p["margin"] > 0 for p in plans)
    assert res["engine"] == pytest.approx({k: getattr(eng, k) for k in res["engine"]}, rel=1e-5)  # the profile's
    assert isinstance(res["prediction_within_tolerance"], bool) and isinstance(res["tuned_at_least_as_fast"], bool)
