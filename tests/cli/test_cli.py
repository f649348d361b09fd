"""The command line: each subcommand on a tiny model, and one-line errors with non-zero exit codes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridmoe
from hybridmoe.cli import main

V3_CONFIG = Path(__file__).parent / "data" / "deepseek_v3_config.json"


def run(capsys, *argv):
    capsys.readouterr()  # drop what building the fixture printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern=""):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern.lower() in lines[0].lower()


def test_generate_streams_text(capsys, tiny_models):
    code, out, err = run(capsys, "generate", tiny_models("deepseek_v3"), "-p", "Hello", "-n", "8",
                         "--temperature", "0")
    assert code == 0 and out.strip()
    assert "8 generated" in err or "stop: eos" in err


def test_generate_chat_flag(capsys, tiny_models):
    code, out, _ = run(capsys, "generate", tiny_models("qwen3_moe"), "-p", "Hi", "--chat", "-n", "4", "--seed", "1")
    assert code == 0


def test_perplexity_json_matches_logits(capsys, tiny_models):
    path = tiny_models("mixtral")
    ids = [5, 9, 100, 33, 2, 71, 250]
    code, out, _ = run(capsys, "perplexity", path, "--tokens", " ".join(map(str, ids)), "--json")
    assert code == 0
    res = json.loads(out)
    logp = torch.log_softmax(hybridmoe.load(path).logits(ids[:-1]), -1)
    want = [-logp[i, t].item() for i, t in enumerate(ids[1:])]
    assert res["n_tokens"] == len(ids) - 1
    assert res["nll_per_token"] == pytest.approx(want, rel=1e-5)
    assert res["nll"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert res["ppl"] == pytest.approx(torch.tensor(res["nll"]).exp().item(), rel=1e-5)
    assert res["argmax"] == logp.argmax(-1).tolist()


def test_perplexity_file(capsys, tiny_models, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.")
    code, out, _ = run(capsys, "perplexity", tiny_models("deepseek_v3"), "--file", f)
    assert code == 0 and "perplexity" in out


def test_inspect_deepseek_v3_from_config_alone(capsys, tmp_path):
    """Published figures: DeepSeek-V3 has 671B parameters, 37B activated per token."""
    (tmp_path / "config.json").write_text(V3_CONFIG.read_text())
    code, out, _ = run(capsys, "inspect", tmp_path, "--json")
    assert code == 0
    s = json.loads(out)
    assert s["params_total"] == pytest.approx(671e9, rel=0.01)
    assert s["params_active"] == pytest.approx(37e9, rel=0.03)
    assert s["moe_layers"] == 58 and s["experts_per_token"] == 8
    # FP8 experts: about 1 byte per parameter, and 8 of 256 experts per MoE layer are read per token
    assert s["bytes_read_per_token"]["routed_experts"] == pytest.approx(
        s["bytes"]["routed_experts"] * 8 / 256, rel=1e-3)
    code, out, _ = run(capsys, "inspect", tmp_path)
    assert code == 0 and "routed_experts" in out and "671" in out


def test_error_missing_shard(capsys, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM
    d = tmp_path / "s"
    AutoModelForCausalLM.from_pretrained(tiny_models("qwen3_moe")).save_pretrained(d, max_shard_size="50KB")
    sorted(d.glob("model-*.safetensors"))[0].unlink()
    code, _, err = run(capsys, "generate", d, "-p", "x")
    assert_one_line_error(code, err, "missing")


def test_error_truncated(capsys, tiny_models, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_models("qwen3_moe"), d)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:5000])
    code, _, err = run(capsys, "perplexity", d, "--tokens", "1 2 3")
    assert_one_line_error(code, err, "truncated")


def test_error_unknown_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run(capsys, "inspect", tmp_path)
    assert_one_line_error(code, err, "gpt2")


def test_error_shape_mismatch(capsys, tiny_models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_models("mixtral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", d, "-p", "x")
    assert_one_line_error(code, err, "shape")


def test_error_prompt_longer_than_context(capsys, tiny_models):
    code, _, err = run(capsys, "generate", tiny_models("deepseek_v3"), "-p", "word " * 100, "--ctx", "32")
    assert_one_line_error(code, err, "context")


def test_error_bad_device(capsys, tiny_models):
    code, _, err = run(capsys, "generate", tiny_models("deepseek_v3"), "-p", "x", "--device", "tpu")
    assert_one_line_error(code, err, "device")


def test_error_missing_directory(capsys, tmp_path):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "-p", "x")
    assert_one_line_error(code, err, "nope")


def test_console_script_help():
    exe = shutil.which("hybridmoe") or None
    cmd = [exe] if exe else [sys.executable, "-m", "hybridmoe.cli"]
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": "."})
    assert res.returncode == 0
    for sub in ("chat", "repl", "generate", "perplexity", "inspect"):
        assert sub in res.stdout


def test_generate_with_a_profile(capsys, tiny_models, tmp_path):
    code, out, _ = run(capsys, "generate", tiny_models("deepseek_v3"), "-p", "Hi", "-n", "4", "--accelerator", "cpu",
                       "--profile", "cpu-only")
    assert code == 0 and out.strip()
    bad = tmp_path / "bad.toml"
    bad.write_text("[hardware]\nram_total_gib = 'lots'\n")
    code, _, err = run(capsys, "generate", tiny_models("deepseek_v3"), "-p", "Hi", "--profile", str(bad))
    assert_one_line_error(code, err, "bad.toml")


def test_offload_flags_reach_load(capsys, tiny_models, monkeypatch):
    seen = {}
    real = hybridmoe.load

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(hybridmoe, "load", spy)
    code, out, _ = run(capsys, "generate", tiny_models("qwen3_moe"), "-p", "Hi", "-n", "3", "--accelerator", "cpu",
                       "--expert-cache-slots", "2", "--no-cuda-graphs", "--cpu-activations", "int8",
                       "--experts-tier", "pinned", "--temperature", "0")
    assert code == 0
    o = seen["options"]
    assert o.cuda_graphs is False and o.cpu_activations == "int8"
    assert o.expert_cache_slots == 2 and o.experts_tier == "pinned" and o.prefetch is True
