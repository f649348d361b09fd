"""`inspect` and `plan` read a GGUF header: sizes as the file stores them."""
import json

from hybridmoe.cli import main
from hybridmoe.formats.gguf import GGUFFile


def test_inspect_gguf_counts_the_file_bytes(gguf_models, capsys):
    _, path = gguf_models("deepseek_v3", "q4_k_m")
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    f = GGUFFile(path)
    assert s["bytes"]["routed_experts"] == sum(t.nbytes for n, t in f.tensors.items() if "_exps." in n)
    assert s["bytes_total"] == sum(t.nbytes for t in f.tensors.values())
    assert "Q4_K" in s["dtype"]
    # top-k of the experts per MoE layer are read per token
    per_token = s["bytes"]["routed_experts"] * s["experts_per_token"] // s["routed_experts"]
    assert abs(s["bytes_read_per_token"]["routed_experts"] - per_token) <= s["moe_layers"]
    # and how the CPU decodes each expert type
    types = {t.qtype.name for n, t in f.tensors.items() if "_exps." in n}
    assert set(s["expert_cpu_decode"]) == types and "in place" in s["expert_cpu_decode"]["Q4_K"]
    assert main(["inspect", str(path)]) == 0
    assert "Q4_K experts on the CPU: exact row kernel; in place with --cpu-activations int8" in capsys.readouterr().out


def test_decode_routes_name_the_slow_types():
    from gguf import GGMLQuantizationType as T

    from hybridmoe.kernels.cpu import decode_route
    assert "repacked" in decode_route(T.Q4_0)
    assert "no 8-bit kernel" in decode_route(T.IQ1_S)
    assert "dequantized" in decode_route(T.IQ1_M)


def test_plan_gguf_slots_hold_the_blocks(gguf_models, capsys):
    _, path = gguf_models("deepseek_v3", "q4_k_m")
    capsys.readouterr()
    assert main(["plan", str(path), "--gpus", "1x1GiB", "--ram", "8GiB", "--json"]) in (0, 3)
    p = json.loads(capsys.readouterr().out)
    f = GGUFFile(path)
    expert_bytes = sum(t.nbytes for n, t in f.tensors.items() if "_exps." in n)
    assert abs(p["experts"]["bytes"] - expert_bytes) <= expert_bytes * 0.02


def test_plan_counts_non_expert_weights_kept_as_blocks(gguf_models, capsys):
    """--gpu-weights quantized: the GPU holds the file's blocks of the other layers, not bfloat16 copies."""
    _, path = gguf_models("qwen3_moe", "q4_k_m")
    plans = {}
    for mode in ("dequantized", "quantized"):
        capsys.readouterr()
        assert main(["plan", str(path), "--gpus", "1x1GiB", "--ram", "8GiB", "--gpu-weights", mode, "--json"]) in (0, 3)
        plans[mode] = json.loads(capsys.readouterr().out)
    f = GGUFFile(path)
    stored = sum(t.nbytes for n, t in f.tensors.items() if "_exps." not in n)
    weights = {m: sum(d["bytes_weights"] for d in p["devices"]) for m, p in plans.items()}
    assert weights["quantized"] < weights["dequantized"]
    assert abs(weights["quantized"] - stored) <= stored * 0.05
    assert main(["plan", str(path), "--gpu-weights", "fp4"]) != 0
