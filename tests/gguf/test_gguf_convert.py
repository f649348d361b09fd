"""`hybridmoe convert`: files llama.cpp loads, with the tensor types asked for, from F32, BF16 and FP8 sources."""
import json

import torch
from conftest import needs_llama
from gguf_helpers import gguf_weights, llama_logits, rel_err

import hybridmoe
from hybridmoe.cli import main
from hybridmoe.formats.gguf import GGUFFile


def expert_and_attention_types(path):
    f = GGUFFile(path)
    experts = {t.qtype.name for n, t in f.tensors.items() if "_exps" in n}
    attention = {t.qtype.name for n, t in f.tensors.items() if n.endswith(("attn_q_a.weight", "attn_output.weight"))}
    return experts, attention


def test_cli_q8_0_and_bf16(gguf_models, tmp_path, capsys):
    hf, _ = gguf_models("qwen3_moe", "f32")
    for kind, want in (("q8_0", "Q8_0"), ("bf16", "BF16")):
        out = tmp_path / f"{kind}.gguf"
        assert main(["convert", str(hf), str(out), "--type", kind]) == 0
        assert "wrote" in capsys.readouterr().out
        f = GGUFFile(out)
        assert {t.qtype.name for n, t in f.tensors.items() if "_exps" in n or "attn_q." in n} == {want}
        assert f.tensors["blk.0.ffn_gate_inp.weight"].qtype.name == "F32"  # routers stay f32
        assert f.get("tokenizer.ggml.model") == "gpt2" and len(f.get("tokenizer.ggml.tokens")) == 384


@needs_llama
def test_q4_k_m_experts_are_k_quants_and_the_rest_q8_0(gguf_models, tmp_path):
    hf, f32 = gguf_models("deepseek_v3", "f32")
    out = tmp_path / "q4.gguf"
    assert main(["convert", str(hf), str(out), "--type", "q4_k_m"]) == 0
    experts, attention = expert_and_attention_types(out)
    assert experts <= {"Q4_K", "Q6_K"} and "Q4_K" in experts and attention == {"Q8_0"}
    f = GGUFFile(out)
    assert f.get("deepseek2.expert_gating_func") == 2  # sigmoid routing survives into llama.cpp's metadata
    ids = list(range(8, 72))
    ours, theirs = hybridmoe.load(out).logits(ids).numpy(), llama_logits(out, ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_bf16_and_fp8_sources(gguf_models, tmp_path):
    """A BF16 checkpoint converts to the same weights as its f32 original; an FP8 one to its dequantized values."""
    from safetensors.torch import load_file, save_file
    hf, _ = gguf_models("deepseek_v3", "f32")
    weights = load_file(hf / "model.safetensors")
    for name in ("bf16", "fp8"):
        src = tmp_path / name
        src.mkdir()
        for p in hf.iterdir():
            if p.name != "model.safetensors":
                (src / p.name).write_bytes(p.read_bytes())
        out = {}
        for k, v in weights.items():
            if name == "bf16":
                out[k] = v.bfloat16()
            elif v.ndim == 2 and "norm" not in k and "mlp.gate.weight" not in k:
                scale = v.abs().amax().clamp_min(1e-8) / 448.0  # one block: these tensors are <= 512 x 512
                rows, cols = -(-v.shape[0] // 128), -(-v.shape[1] // 128)
                out[k] = (v / scale).to(torch.float8_e4m3fn)
                out[k + "_scale_inv"] = scale.expand(rows, cols).contiguous().float()
            else:
                out[k] = v
        save_file(out, src / "model.safetensors", metadata={"format": "pt"})
        if name == "fp8":
            cfg = json.loads((src / "config.json").read_text())
            cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
            (src / "config.json").write_text(json.dumps(cfg))
        gguf = tmp_path / f"{name}.gguf"
        assert main(["convert", str(src), str(gguf), "--type", "f32"]) == 0
        _, w = gguf_weights(gguf)
        want = weights["model.layers.1.mlp.shared_experts.up_proj.weight"]
        if name == "bf16":
            want = want.bfloat16().float()
        else:
            s = want.abs().amax() / 448.0
            want = (want / s).to(torch.float8_e4m3fn).float() * s
        assert rel_err(w["blk.1.ffn_up_shexp.weight"], want) < 1e-6, name


def test_unsupported_model_type_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["convert", str(tmp_path), str(tmp_path / "o.gguf")]) == 1
    assert "model_type 'gpt2' cannot be converted to GGUF" in capsys.readouterr().err
