"""`plan --cluster`: layouts vLLM and SGLang support, memory per GPU recomputed from the configs' own numbers, launch
commands checked against the engines' argument parsers (when importable), and a stable JSON schema."""
import json
import math
import os
import shlex
from pathlib import Path

import pytest

from hybridmoe.cli import main
from hybridmoe.offload.cluster import GiB, engine_data, model_shape, parse_cluster
from hybridmoe.offload.cluster_plan import plan_cluster

HERE = Path(__file__).parent
CONFIGS = {
    "deepseek_r1": json.loads((HERE.parent / "cli" / "data" / "deepseek_v3_config.json").read_text()),  # FP8, as R1
    "qwen3_235b": json.loads((HERE / "data" / "qwen3_235b_a22b_config.json").read_text()),
    "mixtral_8x22b": json.loads((HERE / "data" / "mixtral_8x22b_config.json").read_text()),
}
CLUSTERS = ("1x8:H100-80GB", "2x8:H100-80GB", "4x8:A100-40GB")
CTX, SEQS = 4096, 64


@pytest.fixture(scope="module")
def shapes():
    return {name: model_shape(cfg) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def plans(shapes):
    return {(m, c): plan_cluster(shapes[m], parse_cluster(c), f"/models/{m}", CTX, SEQS).to_json()
            for m in CONFIGS for c in CLUSTERS}


def expert_bytes(cfg: dict) -> float:
    """Routed-expert bytes of the whole checkpoint, from config.json alone."""
    if cfg["model_type"] == "deepseek_v3":  # FP8 with one f32 scale per 128x128 block
        n = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
        per = 3 * cfg["moe_intermediate_size"] * cfg["hidden_size"]
        return n * cfg["n_routed_experts"] * (per + 4 * per / (128 * 128))
    n_exp = cfg.get("num_experts") or cfg["num_local_experts"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * n_exp * 3 * inter * cfg["hidden_size"] * 2


def kv_per_token_gpu(cfg: dict, attn_tp: int) -> int:
    """KV bytes per token on one GPU (bf16): MLA's latent whole on every GPU; GQA heads split, one at least."""
    if cfg["model_type"] == "deepseek_v3":
        per_layer = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    else:
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        per_layer = 2 * head * max(1, cfg["num_key_value_heads"] // attn_tp)
    return per_layer * 2 * cfg["num_hidden_layers"]


@pytest.mark.parametrize("model", CONFIGS)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_memory_table_adds_up(plans, model, cluster):
    cfg, p = CONFIGS[model], plans[model, cluster]
    spec = parse_cluster(cluster)
    budget = spec.gpu.memory_gib * 0.90
    for e in p["engines"].values():
        for c in e["candidates"]:
            g = c["memory_gib"]
            assert g["total"] == pytest.approx(g["weights"] + g["experts"] + g["kv_cache"] + g["reserve"], abs=0.02)
            assert g["budget"] == pytest.approx(budget, abs=0.01)
            assert g["short"] == pytest.approx(max(0.0, g["total"] - budget), abs=0.02)
            assert c["fits"] == (c["supported"] and g["total"] <= budget)
            if c["pp"] == 1:  # experts: one copy spread over the expert group of each stage
                group = c["tp"] * c["dp"]
                assert g["experts"] == pytest.approx(expert_bytes(cfg) / group / GiB, rel=1e-3, abs=0.01)
                attn_tp = c["tp"] // c["attn_dp"]
                seqs = math.ceil(SEQS / (c["dp"] * c["attn_dp"]))
                assert g["kv_cache"] == pytest.approx(seqs * CTX * kv_per_token_gpu(cfg, attn_tp) / GiB, abs=0.01)
                assert c["sequences_per_attention_group"] == seqs
            else:  # the fullest stage holds ceil(L / pp) layers; experts split over its tp GPUs
                n_moe = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
                share = min(math.ceil(cfg["num_hidden_layers"] / c["pp"]), n_moe) / n_moe
                assert g["experts"] == pytest.approx(expert_bytes(cfg) * share / c["tp"] / GiB, rel=1e-3, abs=0.01)
        if e["fits"]:
            chosen = next(c for c in e["candidates"] if c["name"] == e["layout"])
            assert chosen["fits"] and chosen["throughput_tok_s"]["low"] <= chosen["throughput_tok_s"]["high"]


def test_deepseek_fp8_weights_are_one_byte_and_need_two_h100_nodes(plans):
    cfg = CONFIGS["deepseek_r1"]
    one = plans["deepseek_r1", "1x8:H100-80GB"]
    assert one["model"]["dtype"].startswith("fp8")
    assert one["fits"] is False
    for e in one["engines"].values():
        assert e["layout"] is None and e["commands"] == [] and e["smallest_cluster"] == "2x8 H100-80GB"
        for c in e["candidates"]:
            # experts alone, at one byte per weight, are more than an eighth of 8 GPUs' budget
            floor = expert_bytes(cfg) / 8 / GiB + 3.0 - 79.65 * 0.9
            assert c["memory_gib"]["short"] >= floor > 0
    two = plans["deepseek_r1", "2x8:H100-80GB"]
    assert two["fits"] and all(e["fits"] for e in two["engines"].values())


def test_unsupported_layouts_say_why(plans):
    a100 = plans["deepseek_r1", "4x8:A100-40GB"]["engines"]
    sg = {c["name"]: c for c in a100["sglang"]["candidates"]}
    assert "128-wide FP8 blocks" in " ".join(sg["tp"]["unsupported"])  # 2048 / 32 = 64 columns a GPU
    assert a100["sglang"]["layout"] == "tp+pp" and a100["vllm"]["layout"] == "tp+dp+ep"
    vl = {c["name"]: c for c in a100["vllm"]["candidates"]}
    assert vl["dp+ep"]["supported"] and not vl["dp+ep"]["fits"] and vl["dp+ep"]["memory_gib"]["short"] > 0
    mix = plans["mixtral_8x22b", "2x8:H100-80GB"]["engines"]
    vm = {c["name"]: c for c in mix["vllm"]["candidates"]}
    assert "8 routed experts do not spread evenly over 16 GPUs" in vm["dp+ep"]["unsupported"][0]
    sm = {c["name"]: c for c in plans["mixtral_8x22b", "4x8:A100-40GB"]["engines"]["sglang"]["candidates"]}
    assert "48 attention heads do not split over 32 GPUs" in sm["tp"]["unsupported"]
    qw = {c["name"]: c for c in plans["qwen3_235b", "1x8:H100-80GB"]["engines"]["vllm"]["candidates"]}
    assert qw["tp"]["fits"] and not qw["dp+ep"]["fits"]  # 15 GiB of attention on every GPU tips it over


def test_many_sequences_need_data_parallel_attention_for_deepseek(shapes):
    """At 512 sequences MLA's latent cache, whole on every GPU of a tensor-parallel group, fits only when each GPU
    holds its own sequences: vLLM's dp+ep and SGLang's data-parallel attention."""
    p = plan_cluster(shapes["deepseek_r1"], parse_cluster("2x8:H100-80GB"), "/m", CTX, 512).to_json()
    assert p["engines"]["vllm"]["layout"] == "dp+ep" and p["engines"]["sglang"]["layout"] == "dp-attention+ep"
    assert [c["name"] for c in p["engines"]["sglang"]["candidates"] if c["fits"]] == ["dp-attention+ep"]


def test_mla_cache_is_replicated_under_tensor_parallelism_not_under_data_parallel_attention(plans):
    c = {x["name"]: x for x in plans["deepseek_r1", "2x8:H100-80GB"]["engines"]["sglang"]["candidates"]}
    assert c["tp"]["memory_gib"]["kv_cache"] == pytest.approx(16 * c["dp-attention+ep"]["memory_gib"]["kv_cache"],
                                                              rel=0.01)


@pytest.mark.parametrize("model", CONFIGS)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_commands_use_only_the_data_files_flags_one_per_node(plans, model, cluster):
    nodes = parse_cluster(cluster).nodes
    data = engine_data()["engines"]
    for key, e in plans[model, cluster]["engines"].items():
        if not e["fits"]:
            continue
        flags = set(data[key]["flags"].values()) | {data[key]["model"]}
        assert [c["node"] for c in e["commands"]] == list(range(nodes))
        for c in e["commands"]:
            assert shlex.split(c["command"]) == c["argv"]
            assert {a for a in c["argv"] if a.startswith("--")} <= flags
            assert c["argv"][:len(data[key]["launcher"])] == data[key]["launcher"]


def _vllm_parser(monkeypatch):
    if "VLLM_TARGET_DEVICE" not in os.environ:  # parsing needs no GPU, but vLLM wants a platform to import
        monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        return make_arg_parser(FlexibleArgumentParser(allow_abbrev=False))
    except Exception as e:  # noqa: BLE001 - any import failure means the engine is not usable here
        pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e})")


def _sglang_parser():
    import argparse
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SGLang is not importable here ({type(e).__name__}: {e})")
    p = argparse.ArgumentParser(allow_abbrev=False)  # exact flag names, no prefixes
    ServerArgs.add_cli_args(p)
    return p


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_commands_parse_with_the_engines_own_parser(plans, engine, monkeypatch):
    parser = _vllm_parser(monkeypatch) if engine == "vllm" else _sglang_parser()
    checked = 0
    for (model, cluster), p in plans.items():
        e = p["engines"][engine]
        lay = next((c for c in e["candidates"] if c["name"] == e["layout"]), None)
        for cmd in e["commands"]:
            skip = len(engine_data()["engines"][engine]["launcher"])
            ns = parser.parse_args(cmd["argv"][skip:])
            if engine == "vllm":
                assert (ns.model_tag, ns.max_model_len) == (f"/models/{model}", CTX)
                assert (ns.tensor_parallel_size, ns.pipeline_parallel_size, ns.data_parallel_size) == \
                    (lay["tp"], lay["pp"], lay["dp"])
                assert ns.enable_expert_parallel == lay["ep"] and ns.headless == (cmd["node"] > 0)
            else:
                assert (ns.model_path, ns.context_length, ns.tp_size, ns.pp_size) == \
                    (f"/models/{model}", CTX, lay["tp"], lay["pp"])
                assert ns.attn_dp_size == lay["attn_dp"] and ns.ep_size == (lay["tp"] if lay["ep"] else 1)
                assert ns.nnodes == p["cluster"]["nodes"] and ns.node_rank == cmd["node"]
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("text", ["2x", "x8", "2*8", "0x8", "2x0", "2x64", "2x8:", "2x8:Z999", "2x8:0GiB",
                                  "two"])
def test_bad_cluster_strings_are_one_line_errors(capsys, tmp_path, text):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["mixtral_8x22b"]))
    assert main(["plan", str(tmp_path), "--cluster", text]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --cluster") and err.count("\n") == 1 and "Traceback" not in err


def test_gpu_names_and_sizes():
    assert parse_cluster("2X8:h100").gpu.name == "H100-80GB"
    assert parse_cluster("2x8").gpu.name == "H100-80GB"  # the default
    c = parse_cluster("4x8:96GiB")
    assert (c.nodes, c.gpus_per_node, c.gpu.memory_gib, c.gpu.hbm_tb_s) == (4, 8, 96, 0)


def test_json_schema_is_stable(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["deepseek_r1"]))
    code = main(["plan", str(tmp_path / "config.json"), "--cluster", "2x8:H100-80GB", "--json",
                 "--gpus", "1x24GiB", "--ram", "64GiB"])
    assert code == 0
    p = json.loads(capsys.readouterr().out)
    assert set(p) == {"schema", "model", "cluster", "context", "concurrency", "fits", "engines", "local",
                      "assumptions", "notes"}
    assert p["schema"] == 1
    assert set(p["model"]) == {"path", "model_type", "dtype", "layers", "routed_experts", "experts_per_token",
                               "kv_cache", "weights_gib"}
    assert set(p["cluster"]) == {"nodes", "gpus_per_node", "gpu", "gpu_memory_gib"}
    assert set(p["engines"]) == {"vllm", "sglang"}
    for e in p["engines"].values():
        assert set(e) == {"engine", "version", "flags_from", "fits", "layout", "candidates", "commands",
                          "smallest_cluster"}
        assert set(e["candidates"][0]) == {"name", "tp", "pp", "dp", "attn_dp", "ep", "gpus", "supported",
                                           "unsupported", "fits", "memory_gib", "sequences_per_attention_group",
                                           "max_sequences", "throughput_tok_s"}
        assert set(e["candidates"][0]["memory_gib"]) == {"weights", "experts", "kv_cache", "reserve", "total",
                                                         "budget", "short"}
        assert set(e["commands"][0]) == {"node", "argv", "command"}
        rates = [c["throughput_tok_s"] for c in e["candidates"] if c["throughput_tok_s"]]
        assert set(rates[0]) == {"low", "high", "per_sequence_low", "per_sequence_high", "bound"}
    # served from the directory, not its config.json
    assert p["engines"]["vllm"]["commands"][0]["argv"][2] == str(tmp_path.resolve())
    assert p["local"]["verdict"] == "no" and p["local"]["clusters_that_serve_it"]["vllm"] == "2x8 H100-80GB"


def test_text_output_and_exit_codes(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["deepseek_r1"]))
    assert main(["plan", str(tmp_path), "--cluster", "1x8:H100-80GB", "--gpus", "1x24GiB", "--ram", "64GiB"]) == 3
    out = capsys.readouterr().out
    assert "GiB short per GPU" in out and "smallest cluster of these GPUs that does: 2x8 H100-80GB" in out
    assert "DOES NOT FIT" in out
    assert main(["plan", str(tmp_path), "--cluster", "2x8:H100-80GB", "--ctx", "8192", "--concurrency", "128",
                 "--gpus", "1x24GiB", "--ram", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "vllm serve" in out and "python -m sglang.launch_server" in out and "node 1:" in out
    assert "tok/s" in out and "throughput assumptions" in out


def test_a_model_that_fits_here_suggests_hybridmoe(capsys, tmp_path):
    tiny = dict(CONFIGS["deepseek_r1"], num_hidden_layers=4, n_routed_experts=16, moe_intermediate_size=128,
                hidden_size=256, intermediate_size=512, vocab_size=1000, num_attention_heads=4, q_lora_rank=64,
                kv_lora_rank=32)
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    assert main(["plan", str(tmp_path), "--cluster", "1x8:H100-80GB", "--json", "--gpus", "1x24GiB",
                 "--ram", "64GiB"]) == 0
    local = json.loads(capsys.readouterr().out)["local"]
    assert local["verdict"] == "fits" and f"hybridmoe chat {tmp_path} --device cuda" in local["text"]
    assert "clusters_that_serve_it" not in local


def test_throughput_grows_with_concurrency_and_respects_the_per_layer_floor(shapes):
    a = engine_data()["assumptions"]
    shape, layers = shapes["qwen3_235b"], CONFIGS["qwen3_235b"]["num_hidden_layers"]
    rates = []
    for seqs in (1, 8, 64):
        p = plan_cluster(shape, parse_cluster("1x8:H100-80GB"), "/m", CTX, seqs).to_json()
        r = next(c for c in p["engines"]["vllm"]["candidates"] if c["name"] == "tp")["throughput_tok_s"]
        assert r["low"] <= r["high"] and r["per_sequence_high"] <= 1e6 / (layers * a["layer_floor_us"][1]) + 0.1
        assert r["low"] == pytest.approx(seqs * r["per_sequence_low"], rel=0.01)
        rates.append(r["low"])
    assert rates[0] < rates[1] < rates[2]
    # a GPU named by its size only has no bandwidth figure: memory is checked, no speed is guessed
    p = plan_cluster(shape, parse_cluster("1x8:80GiB"), "/m", CTX, 8).to_json()
    assert p["fits"] and all(c["throughput_tok_s"] is None for c in p["engines"]["vllm"]["candidates"])
    assert any("no throughput estimate" in n for n in p["notes"])


def test_a_workstation_with_enough_ram_is_pointed_at_a_4bit_gguf(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["deepseek_r1"]))
    assert main(["plan", str(tmp_path), "--cluster", "2x8:H100-80GB", "--json", "--gpus", "2x48GiB",
                 "--ram", "512GiB"]) == 0
    local = json.loads(capsys.readouterr().out)["local"]
    # 654B expert weights: 1218 GiB widened to bf16 stream from disk; at 4.5 bits they are 343 GiB
    assert local["verdict"] == "disk" and "streaming 1218.0 GiB" in local["text"]
    assert "4-bit GGUF (experts 342.6 GiB) it fits in RAM" in local["text"]
    assert local["clusters_that_serve_it"] == {"vllm": "2x8 H100-80GB", "sglang": "2x8 H100-80GB"}
