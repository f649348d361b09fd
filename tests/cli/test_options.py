"""Run options: one dataclass with its defaults, validated once; precedence flag > profile > default; and the
command line's settings and messages that must take effect (device, demo, --ctx, notices, windows, Ctrl-C)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hybridmoe
from hybridmoe import Done, Notice, RunOptions, Stats, Text
from hybridmoe.cli import build_parser, main, run_options
from hybridmoe.errors import ConfigError
from hybridmoe.hardware import profile as P
from hybridmoe.options import DEMO_MODEL, CpuActivations, Tier

ROOT = Path(__file__).resolve().parents[2]
RUN_COMMANDS = ("chat", "repl", "generate", "perplexity", "bench")


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err


# --- the dataclass ---------------------------------------------------------------------------------------------
def test_defaults_live_in_one_place_and_modes_are_checked_once():
    o = RunOptions()
    assert o.device == "auto" and o.experts_tier is Tier.MMAP and o.cpu_activations is CpuActivations.F32
    assert o.context is None and o.devices == 1 and o.prefetch and o.cuda_graphs
    assert RunOptions(experts_tier="pinned").experts_tier is Tier.PINNED  # strings become enums once
    for bad, flag in ((dict(experts_tier="disk"), "--experts-tier"), (dict(cpu_activations="int4"),
                      "--cpu-activations"), (dict(accelerator="tpu"), "--accelerator"), (dict(context=0), "--ctx"),
                      (dict(devices=0), "--devices"), (dict(expert_cache_slots=-1), "--expert-cache-slots"),
                      (dict(device="gpu"), "--device"), (dict(dtype="int8"), "--dtype")):
        with pytest.raises(ConfigError, match=flag):
            RunOptions(**bad)
    with pytest.raises(TypeError, match="warp"):
        o.updated(warp=9)


def test_precedence_flag_over_profile_over_default():
    prof = {"experts_tier": "pinned", "context": 8192, "cpu_threads": 3, "prefetch_margin": 1}
    o = RunOptions.merged({"context": 512}, prof)
    assert (o.experts_tier, o.context, o.cpu_threads, o.prefetch_margin) == ("pinned", 512, 3, 1)
    o = RunOptions.merged({"experts_tier": "mmap"}, prof)  # the default's value, given explicitly, still wins
    assert o.experts_tier == "mmap"
    assert RunOptions.merged({}, {}).experts_tier == RunOptions().experts_tier


def write_profile(path: Path, plan: str, gpus: bool = False) -> Path:
    base = (P.PROFILES_DIR / "cpu-only.toml").read_text()
    head, _, rest = base.partition("[plan]")
    tail = rest[rest.index("\n["):] if "\n[" in rest else ""
    path.write_text(head + "[plan]\n" + plan + "\n" + tail)
    P.load(path)
    return path


def test_explicit_experts_tier_is_not_overridden_by_a_profile(tmp_path):
    prof = write_profile(tmp_path / "p.toml", 'experts_tier = "pinned"\ncontext = 2048')
    parse = build_parser().parse_args
    assert run_options(parse(["generate", "m", "-p", "x", "--profile", str(prof)])).experts_tier == "pinned"
    args = parse(["generate", "m", "-p", "x", "--profile", str(prof), "--experts-tier", "mmap"])
    assert run_options(args).experts_tier == "mmap"
    assert run_options(parse(["generate", "m", "-p", "x"])).experts_tier == "mmap"  # no profile: the default


def test_a_tuned_profile_sets_threads_devices_slots_context_and_costs(capsys, tiny_models, tmp_path, monkeypatch):
    """What `hybridmoe tune` writes takes effect: the run gets the profile's threads, context, GPUs, slots."""
    out = tmp_path / "tuned.toml"
    model = tiny_models("qwen3_moe")
    assert main(["tune", str(model), "--quick", "-o", str(out)]) == 0
    prof = P.load(out)
    text = out.read_text().replace(f"cpu_threads = {prof.plan.cpu_threads}", "cpu_threads = 1")
    text = text.replace("devices = 0", "devices = 2").replace("expert_cache_slots = []", "expert_cache_slots = [3, 5]")
    out.write_text(text)
    seen = {}
    real = hybridmoe.load

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(hybridmoe, "load", spy)
    threads = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "generate", model, "-p", "Hi", "-n", "2", "--accelerator", "cpu",
                           "--profile", out, "--ctx", "256")
        assert code == 0, err
        assert torch.get_num_threads() == 1  # the profile's cpu_threads reached the runtime
    finally:
        torch.set_num_threads(threads)
    o = seen["options"]
    assert (o.cpu_threads, o.devices, o.expert_cache_slots, o.context) == (1, 2, 3, 256)
    assert o.cost_model == P.load(out).cost
    # Without the offload engine, per-GPU choices of the profile do not apply (and are no error).
    code, _, err = run(capsys, "generate", model, "-p", "Hi", "-n", "2", "--device", "cpu", "--profile", out)
    assert code == 0, err
    assert seen["options"].devices == 1 and seen["options"].expert_cache_slots is None


# --- defaults of the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_device_defaults_to_auto_everywhere(command):
    extra = {"generate": ["-p", "x"], "perplexity": ["--tokens", "1 2"]}.get(command, [])
    args = build_parser().parse_args([command, *extra])
    assert run_options(args).device == "auto"
    from hybridmoe.engine.engine import resolve_device
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    from hybridmoe.models.convert import convert
    return convert(DEMO_MODEL, tmp_path_factory.mktemp("demo") / "demo.gguf", "q8_0", progress=False)


def test_demo_names_the_built_in_model_for_every_command(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "demo", "-p", "The os module", "-n", "3", "--temperature", "0")
    assert code == 0 and out.strip()
    code, out, _ = run(capsys, "generate", "-p", "The os module", "-n", "3", "--temperature", "0")  # no MODEL
    assert code == 0 and out.strip()
    code, out, _ = run(capsys, "perplexity", "demo", "--tokens", "5 6 7 8", "--json")
    assert code == 0 and json.loads(out)["n_tokens"] == 3
    code, out, _ = run(capsys, "bench", "demo", "-p", "8", "-n", "4", "-r", "1", "--no-warmup", "--json")
    assert code == 0 and json.loads(out)
    code, out, _ = run(capsys, "inspect", "demo", "--json")
    assert code == 0 and json.loads(out)["model_type"] == "deepseek_v3"
    code, out, _ = run(capsys, "plan", "demo", "--ram", "8GiB", "--json")
    assert code == 0 and json.loads(out)["fits"]
    gguf = tmp_path / "demo.gguf"
    code, out, _ = run(capsys, "convert", "demo", gguf)
    assert code == 0 and gguf.stat().st_size > 0
    assert hybridmoe.load("demo").path == DEMO_MODEL


def test_ctx_zero_is_refused_in_one_line(capsys):
    code, _, err = run(capsys, "generate", "demo", "-p", "x", "--ctx", "0")
    one_line_error(code, err, "--ctx 0")
    with pytest.raises(ConfigError, match="--ctx"):
        hybridmoe.load(context=0)


# --- messages that must reach the user ------------------------------------------------------------------------
class NoticeEngine:
    """An engine whose answer carries a notice, as the offload engine's are (cache shrunk, CUDA graphs off)."""
    path, device, tokenizer = Path("fake"), "cpu", None

    def generate(self, prompt, config=None):
        return self.chat([], config)

    def chat(self, messages, config=None):
        yield Notice("expert cache shrunk to 5 slots")
        yield Text("hello")
        yield Stats("decode", 1, 1, 1.0, 1.0, 0.1, {})
        yield Done("length", 1, 1, "hello")

    def stop(self):
        pass


def test_engine_notices_reach_generate(capsys, monkeypatch):
    monkeypatch.setattr("hybridmoe.cli.load_from_args", lambda args: NoticeEngine())
    code, out, err = run(capsys, "generate", "demo", "-p", "x")
    assert code == 0 and out.strip() == "hello"
    assert "note: expert cache shrunk to 5 slots" in err


def test_perplexity_says_how_it_windowed_a_long_text(capsys):
    ids = " ".join(str(5 + i % 50) for i in range(40))
    code, out, err = run(capsys, "perplexity", "demo", "--tokens", ids, "--ctx", "16", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["n_tokens"] == 39 and res["window"] == 16 and res["windows"] == 3
    assert "3 windows of up to 16 tokens" in err
    code, out, err = run(capsys, "perplexity", "demo", "--tokens", "5 6 7", "--json")
    assert code == 0 and "windows" not in err  # fits in one: nothing to say


def test_ctrl_c_during_imports_prints_no_traceback(tmp_path):
    """Ctrl-C while torch and the model code import (the first second or two) ends quietly with status 130."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "hybridmoe", "generate", "demo", "-p", "x"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and "torch" not in maps.read_text():
        time.sleep(0.01)  # until torch's libraries are being mapped: the import is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)


def test_pull_fails_fast_and_in_one_line_without_a_network(capsys, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    code, _, err = run(capsys, "pull", "someone/some-model", "--dry-run")
    assert time.perf_counter() - t0 < 5
    one_line_error(code, err, "cannot reach")


# --- GGUF chat after the one install command -----------------------------------------------------------------
def test_gguf_tokenizer_dependency_is_installed_with_the_package():
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = [r.strip().lower() for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    assert any(r.startswith("llama-cpp-python") for r in requires), requires


def test_gguf_chat_works_and_names_the_package_when_it_is_missing(capsys, demo_gguf, monkeypatch):
    pytest.importorskip("llama_cpp")
    code, out, err = run(capsys, "generate", demo_gguf, "-p", "What does os.path.join do?", "--chat", "-n", "4",
                         "--temperature", "0")
    assert code == 0 and out.strip(), err
    monkeypatch.setattr("hybridmoe.engine.gguf_tokenizer.llama_cpp_available", lambda: False)
    code, _, err = run(capsys, "generate", demo_gguf, "-p", "Hi", "--chat", "-n", "2")
    one_line_error(code, err, "pip install llama-cpp-python")
