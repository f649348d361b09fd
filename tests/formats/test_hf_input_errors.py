"""A damaged or hostile HF model directory is one of our one-line errors naming the file and the key or tensor:
never a foreign exception, a runaway allocation, a file outside the directory, or silently wrong weights."""
import json
import resource
import shutil
import struct
import time

import pytest
import torch

import hybridmoe
from hybridmoe.errors import ConfigError, HybridMoEError, ModelFileError

IDS = [5, 17, 33, 101, 7, 250, 64, 12]


@pytest.fixture
def v3(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models("deepseek_v3"), dst)
    return dst


def set_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def one_line_error(fn, cls=HybridMoEError):
    with pytest.raises(cls) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("key, value, want", [
    ("hidden_size", -64, "hidden_size is -64; it must be a whole number"),
    ("hidden_size", 64.5, "hidden_size is 64.5; it must be a whole number"),
    ("intermediate_size", "128", "intermediate_size is '128'"),
    ("num_hidden_layers", 0, "num_hidden_layers is 0; it must be a whole number of at least 1"),
    ("model_type", ["deepseek_v3"], "model_type ['deepseek_v3'] is not supported"),
    ("tie_word_embeddings", "no", "tie_word_embeddings is 'no'; it must be true or false"),
    ("routed_scaling_factor", "nan", "routed_scaling_factor is 'nan'; it must be a finite number"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps is -1e-06; it must be a finite number above 0"),
    ("num_experts_per_tok", 0, "num_experts_per_tok is 0"),
    ("num_experts_per_tok", -2, "num_experts_per_tok is -2"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, "rope_parameters.rope_theta is 0"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": -4.0}, "rope_parameters.factor is -4.0"),
    ("qk_rope_head_dim", 15, "qk_rope_head_dim is 15; it must be even"),
    ("eos_token_id", "one", "eos_token_id is 'one'"),
    ("quantization_config", ["fp8"], "quantization_config is ['fp8']"),
])
def test_config_values_of_the_wrong_type_or_range(v3, key, value, want):
    set_config(v3, **{key: value})
    msg = one_line_error(lambda: hybridmoe.load(v3), ConfigError)
    assert msg.startswith(str(v3 / "config.json")) and want in msg


@pytest.mark.parametrize("key, value, want", [
    ("num_hidden_layers", 10_000_000, "num_hidden_layers is 10000000; it must be at most"),
    ("n_routed_experts", 100_000_000, "n_routed_experts is 100000000; it must be at most"),
    ("num_hidden_layers", 1000, "num_hidden_layers is 1000 but the safetensors files have no tensors for layer 3"),
    ("n_routed_experts", 10_000, "n_routed_experts is 10000 but the safetensors files hold 16 experts per layer"),
])
def test_huge_counts_are_refused_before_anything_is_built(v3, key, value, want):
    set_config(v3, **{key: value})
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    msg = one_line_error(lambda: hybridmoe.load(v3))
    assert want in msg and str(v3 / "config.json") in msg
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB: no runaway allocation
    from hybridmoe.models.loader import read_config
    from hybridmoe.models.summary import summarize
    if "at most" in want:  # `inspect` reads only config.json: the caps guard it
        one_line_error(lambda: summarize(read_config(v3)), ConfigError)


def test_tied_embeddings_load_and_match_transformers(tmp_path):
    """tie_word_embeddings true: the output head is the embedding (it used to fail with a torch traceback)."""
    import tiny
    from transformers import AutoModelForCausalLM
    d = tiny.qwen3_moe(tmp_path / "tied", tie_word_embeddings=True)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0]
    eng = hybridmoe.load(d)
    assert eng.model.output.weight is eng.model.tok_embeddings.weight
    torch.testing.assert_close(eng.logits(IDS), want, rtol=1e-4, atol=1e-4)


def rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's JSON header; the data section is kept as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_float_data_offsets_and_shapes(v3):
    name = "model.layers.1.mlp.gate.weight"

    def floats(h):
        h[name]["data_offsets"] = [float(x) for x in h[name]["data_offsets"]]
    rewrite_header(v3 / "model.safetensors", floats)
    msg = one_line_error(lambda: hybridmoe.load(v3), ModelFileError)
    assert name in msg and "whole numbers" in msg


def test_overlapping_tensors_are_refused(v3):
    a, b = "model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"

    def alias(h):  # b's entry points at a's bytes: same size, so only the overlap tells
        h[b]["data_offsets"] = h[a]["data_offsets"]
    rewrite_header(v3 / "model.safetensors", alias)
    msg = one_line_error(lambda: hybridmoe.load(v3), ModelFileError)
    assert "overlaps" in msg and "model.safetensors" in msg


def test_integer_dtype_relabel_is_refused(v3):
    name = "model.layers.1.mlp.gate.weight"  # f32 relabelled I32: same bytes, garbage values

    def relabel(h):
        h[name]["dtype"] = "I32"
    rewrite_header(v3 / "model.safetensors", relabel)
    msg = one_line_error(lambda: hybridmoe.load(v3), ModelFileError)
    assert name in msg and "dtype I32" in msg


@pytest.mark.parametrize("weight_map, want", [
    ({"model.embed_tokens.weight": "../../../../etc/passwd"}, "'../../../../etc/passwd'"),
    ({"model.embed_tokens.weight": "/etc/passwd"}, "'/etc/passwd'"),
    ({"model.embed_tokens.weight": "sub/../../model.safetensors"}, "inside the model directory"),
    (["model.safetensors"], "weight_map must map tensor names to file names"),
    ({"model.embed_tokens.weight": 3}, "weight_map must map tensor names to file names"),
])
def test_index_cannot_lead_outside_the_directory(v3, weight_map, want):
    (v3 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    msg = one_line_error(lambda: hybridmoe.load(v3), ModelFileError)
    assert want in msg and "model.safetensors.index.json" in msg


def test_deeply_nested_json_is_one_line(v3):
    (v3 / "config.json").write_text("[" * 100_000)
    one_line_error(lambda: hybridmoe.load(v3), ConfigError)


def test_prompt_that_is_not_utf8(tiny_models, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates (argv, surrogateescape); they used to end in
    `TypeError: TextInputSequence must be str`."""
    eng = hybridmoe.load(tiny_models("deepseek_v3"))
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 0xff at character 5\)"):
        eng.generate("Hello\udcff", max_tokens=2)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        eng.chat([{"role": "user", "content": "caf\udce9"}], max_tokens=2)
    from hybridmoe.cli import main
    assert main(["generate", str(tiny_models("deepseek_v3")), "-p", "abc\udcff", "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the prompt is not valid UTF-8") and "\n" not in err
