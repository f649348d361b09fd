"""Loading HF directories: sharding, dtypes, zero-copy, and clear errors for damaged or mismatched files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridmoe
from hybridmoe.errors import ConfigError, ModelFileError

IDS = [5, 17, 33, 101, 7, 250, 64, 12]


@pytest.fixture
def v3(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models("deepseek_v3"), dst)
    return dst


def test_sharded_checkpoint_equals_single_file(v3, tmp_path):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(v3, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(v3 / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert torch.equal(hybridmoe.load(sharded).logits(IDS), hybridmoe.load(v3).logits(IDS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_is_upcast(v3, dtype):
    sd = load_file(v3 / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in sd.items()}, v3 / "model.safetensors")
    eng = hybridmoe.load(v3)
    assert eng.model.output.weight.dtype == torch.float32
    assert eng.model.layers[1].ffn.router.dtype == torch.float32
    assert torch.isfinite(eng.logits(IDS)).all()


def test_weights_alias_the_file_mapping(v3):
    """f32 file, f32 model: parameters are views of the mmap'd file, not copies."""
    from hybridmoe.formats.safetensors import read_header
    header = read_header(v3 / "model.safetensors")
    eng = hybridmoe.load(v3)
    base = eng.model.tok_embeddings.weight.data_ptr() - header["model.embed_tokens.weight"].start
    pairs = [(eng.model.layers[2].attn.wkv_b.weight, "model.layers.2.self_attn.kv_b_proj.weight"),
             (eng.model.experts.weights[1][3][0], "model.layers.1.mlp.experts.3.gate_proj.weight"),
             (eng.model.output.weight, "lm_head.weight")]
    for t, name in pairs:
        assert t.data_ptr() - base == header[name].start  # same mapping, at the tensor's file offset


def test_truncated_file_names_the_file(v3):
    p = v3 / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*truncated"):
        hybridmoe.load(v3)


def test_garbage_header(v3):
    (v3 / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFileError, match="corrupt"):
        hybridmoe.load(v3)


def test_missing_shard_names_it(v3, tmp_path):
    from transformers import AutoModelForCausalLM
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(v3).save_pretrained(sharded, max_shard_size="100KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFileError, match=victim.name):
        hybridmoe.load(sharded)


def test_shape_mismatch_names_tensor(v3):
    cfg = json.loads((v3 / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (v3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"mlp\.(experts\.\d+|shared_experts)\..*shape"):
        hybridmoe.load(v3)


def test_missing_tensor_is_named(v3):
    sd = load_file(v3 / "model.safetensors")
    del sd["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(sd, v3 / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"missing tensor.*layers\.2\.attn\.wkv_b"):
        hybridmoe.load(v3)


def test_unexpected_tensor_is_named(v3):
    sd = load_file(v3 / "model.safetensors")
    sd["model.layers.1.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, v3 / "model.safetensors")
    with pytest.raises(ModelFileError, match="mystery"):
        hybridmoe.load(v3)


def test_mtp_layers_past_num_hidden_layers_are_skipped(v3):
    sd = load_file(v3 / "model.safetensors")
    for k in [k for k in sd if k.startswith("model.layers.2.")]:
        sd[k.replace("layers.2.", "layers.3.")] = sd[k].clone()
    save_file(sd, v3 / "model.safetensors")
    assert torch.isfinite(hybridmoe.load(v3).logits(IDS)).all()


def test_unknown_model_type(v3):
    cfg = json.loads((v3 / "config.json").read_text())
    cfg["model_type"] = "llama4_moe"
    (v3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama4_moe.*not supported"):
        hybridmoe.load(v3)
