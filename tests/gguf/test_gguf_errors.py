"""Bad GGUF input gives one of our errors, naming the key or tensor and the file; never a traceback or a hang."""
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_llama
from gguf import GGMLQuantizationType as T
from gguf_helpers import rewrite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hybridmoe
from hybridmoe.errors import ConfigError, HybridMoEError, ModelFileError
from hybridmoe.formats.gguf import GGUFFile, hf_config
from hybridmoe.models.gguf_loader import load_gguf


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_models):
    """A tiny DeepSeek-V3 (64 wide) at q8_0: small enough to rewrite many times."""
    from hybridmoe.models.convert import convert
    return convert(tiny_models("deepseek_v3"), tmp_path_factory.mktemp("small") / "m.gguf", "q8_0", progress=False)


def test_wrong_magic_and_empty_and_missing(tmp_path, small):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + small.read_bytes()[4:])
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        hybridmoe.load(bad)
    bad.write_bytes(b"")
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(bad)
    with pytest.raises(ModelFileError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_truncated_file_names_the_tensor(tmp_path, small):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"truncated file: tensor 'blk\.\d+\..*' ends at byte"):
        GGUFFile(cut)
    cut.write_bytes(small.read_bytes()[:5000])  # inside the metadata
    with pytest.raises(ModelFileError, match="cut.gguf: corrupt or truncated GGUF header"):
        GGUFFile(cut)


def test_unknown_architecture(tmp_path, small):
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        hf_config(GGUFFile(rewrite(small, tmp_path / "a.gguf", arch="gpt2")))


def test_missing_metadata_key(tmp_path, small):
    f = rewrite(small, tmp_path / "k.gguf", kv={"deepseek2.attention.kv_lora_rank": None})
    with pytest.raises(ConfigError, match="deepseek2.attention.kv_lora_rank"):
        hybridmoe.load(f)


def test_missing_unexpected_and_misshaped_tensors(tmp_path, small):
    with pytest.raises(ModelFileError, match=r"missing tensor\(s\) for layers.1.ffn_norm.weight"):
        load_gguf(rewrite(small, tmp_path / "m.gguf", drop=["blk.1.ffn_norm.weight"]))
    with pytest.raises(ModelFileError, match=r"u.gguf: unexpected tensor 'blk.0.bogus.weight'"):
        load_gguf(rewrite(small, tmp_path / "u.gguf", tensors={"blk.0.bogus.weight": np.zeros(4)}))
    with pytest.raises(ModelFileError, match=r"tensor 'blk.0.attn_norm.weight' has shape \[63\], expected \[64\]"):
        load_gguf(rewrite(small, tmp_path / "s.gguf", tensors={"blk.0.attn_norm.weight": np.ones(63)}))


def test_unsupported_and_unknown_quant_types(tmp_path, small):
    f = GGUFFile(small)
    t = f.tensors["blk.1.ffn_up_exps.weight"]  # [16, 32, 64]
    raw = np.zeros((16, 32, 64 // 32 * 40), dtype=np.uint8)  # Q8_1 blocks: 40 bytes per 32 values
    g = rewrite(small, tmp_path / "t.gguf", tensors={t.name: (raw, T.Q8_1)})  # Q8_1: a ggml type we do not read
    with pytest.raises(ModelFileError, match=r"t.gguf: tensor 'blk.1.ffn_up_exps.weight': GGML type Q8_1"):
        load_gguf(g)
    data = bytearray(small.read_bytes())
    name = b"blk.1.ffn_up_exps.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)  # the type id
    bad = tmp_path / "id.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="tensor 'blk.1.ffn_up_exps.weight' has unknown GGML type 250"):
        GGUFFile(bad)


def test_missing_split_part(tmp_path, small):
    rewrite(small, tmp_path / "s.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("s-*.gguf"))
    parts[1].unlink()
    with pytest.raises(ModelFileError, match=f"split model part.* missing: {parts[1].name}"):
        hybridmoe.load(parts[0])


def test_cli_prints_one_line(tmp_path, capsys):
    from hybridmoe.cli import main
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    assert main(["generate", str(bad), "-p", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "x.gguf" in err and "\n" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_give_only_our_errors(small, data):
    """Random byte edits in the header (and random truncations) reach the reader, the config mapping and the
    loader; whatever happens, only HybridMoEError subclasses come out."""
    raw = bytearray(small.read_bytes())
    header_end = min(len(raw), 64 * 1024)  # metadata, tokenizer and tensor table
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, header_end - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        path.write_bytes(bytes(raw))
        try:
            load_gguf(path)
        except HybridMoEError:
            pass


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """In a child process, so that an abort (exit 134) fails the test instead of ending the test run."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def damaged_vocab(small, tmp_path, kind: str) -> Path:
    f = GGUFFile(small)
    tokens = list(f.get("tokenizer.ggml.tokens"))
    if kind == "duplicate":  # one changed byte: two ids share a text
        tokens[100] = tokens[101]
        return rewrite(small, tmp_path / "dup.gguf", kv={"tokenizer.ggml.tokens": tokens})
    # a SentencePiece ("llama") vocabulary without byte tokens: llama.cpp throws through its C API on any text
    return rewrite(small, tmp_path / "spm.gguf", kv={"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None})


@needs_llama
@pytest.mark.parametrize("kind, want", [("duplicate", "tokenizer.ggml.tokens holds '.*' twice"),
                                        ("spm", "lacks the byte token <0x00>")])
def test_damaged_vocabulary_is_one_line_not_an_abort(small, tmp_path, kind, want):
    """llama.cpp's vocabulary loader aborts the whole process on these (exit 134), for `generate` and for
    hybridmoe.load() in a user's program."""
    path = damaged_vocab(small, tmp_path, kind)
    r = run_python("import sys, hybridmoe\ntry:\n    hybridmoe.load(sys.argv[1])\n"
                   "except hybridmoe.ModelFileError as e:\n    print(e)\n    sys.exit(7)", str(path))
    assert r.returncode == 7, r.stderr[-2000:]
    assert re.search(want, r.stdout) and str(path) in r.stdout
    r = run_python("import sys; from hybridmoe.cli import main; sys.exit(main(sys.argv[1:]))", "generate", str(path),
                   "-p", "hello", "-n", "2")
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(want, err)


@needs_llama
def test_a_vocabulary_llama_cpp_still_aborts_on_is_caught_in_the_child(small, tmp_path, monkeypatch):
    """Whatever the checks miss, the child process that loads the vocabulary first turns into one line."""
    from hybridmoe.engine import gguf_tokenizer
    monkeypatch.setattr(gguf_tokenizer, "check_vocab", lambda meta, where: None)
    path = damaged_vocab(small, tmp_path, "duplicate")
    with pytest.raises(ModelFileError, match=r"dup.gguf: llama.cpp fails on this file's tokenizer metadata \(it "
                                             r"crashed with SIGABRT\)"):
        gguf_tokenizer.GGUFTokenizer(path)


@pytest.mark.parametrize("count", [1, 2, 4, 2 ** 31 - 1])
def test_block_count_must_match_the_layers_present(tmp_path, small, count):
    """block_count 2 used to drop a layer silently, 1 to end in StopIteration, 4 in a missing-tensor error."""
    f = rewrite(small, tmp_path / "b.gguf", kv={"deepseek2.block_count": count})
    with pytest.raises(ModelFileError, match=rf"b.gguf: metadata deepseek2.block_count is {count} but the file has "
                                             r"tensors for layers 0 to 2 \(3 in all\)"):
        hybridmoe.load(f)


@pytest.mark.parametrize("key, value, want", [
    ("deepseek2.expert_used_count", 0, "deepseek2.expert_used_count is 0; it must be a whole number of at least 1"),
    ("deepseek2.rope.freq_base", 0.0, "deepseek2.rope.freq_base is 0.0; it must be a finite number above 1"),
    ("deepseek2.rope.freq_base", -1.0, "deepseek2.rope.freq_base is -1.0"),
    ("deepseek2.attention.layer_norm_rms_epsilon", -1.0, "deepseek2.attention.layer_norm_rms_epsilon is -1.0"),
    ("deepseek2.expert_weights_scale", -2.5, "deepseek2.expert_weights_scale is -2.5"),
    ("deepseek2.rope.scaling.factor", float("nan"), "deepseek2.rope.scaling.factor is nan"),
])
def test_metadata_values_out_of_range_name_the_key(tmp_path, small, key, value, want):
    """These ended in NaN logits and empty text with exit 0, or in a foreign exception at the first forward."""
    f = rewrite(small, tmp_path / "k.gguf", kv={key: value})
    with pytest.raises(ConfigError, match=re.escape(want)) as e:
        hybridmoe.load(f)
    assert "k.gguf (GGUF metadata)" in str(e.value)


def test_vocab_size_must_match_the_tokenizer(tmp_path, small):
    f = rewrite(small, tmp_path / "v.gguf", kv={"deepseek2.vocab_size": 400})
    with pytest.raises(ModelFileError, match="deepseek2.vocab_size is 400 but tokenizer.ggml.tokens has 384 tokens"):
        hybridmoe.load(f)


def test_nan_weights_end_in_an_error_event_naming_the_tensor(tmp_path, small):
    """NaN in the file's weights: every logit is NaN. That was 4 empty tokens and `stop: length`."""
    norm = GGUFFile(small).tensors["blk.1.attn_norm.weight"]
    bad = np.full(norm.shape, np.nan, dtype=np.float32)
    f = rewrite(small, tmp_path / "nan.gguf", tensors={"blk.1.attn_norm.weight": bad})
    events = list(hybridmoe.load(f).generate(list(range(5, 15)), max_tokens=4, temperature=0))
    errors = [e for e in events if isinstance(e, hybridmoe.Error)]
    assert len(errors) == 1 and "NaN or infinite" in errors[0].message
    assert "layers.1.attn_norm.weight" in errors[0].message
    assert events[-1].reason == "error" and events[-1].completion_tokens == 0


def test_overlapping_tensors_are_refused(tmp_path, small):
    """A tensor table whose offsets make two tensors share bytes used to load, the one tensor read as the other."""
    data = bytearray(small.read_bytes())

    def offset_field(name: bytes) -> int:
        at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        return at + 4 + 8 * struct.unpack_from("<I", data, at)[0] + 4  # past the rank, the shape and the type
    gate = struct.unpack_from("<Q", data, offset_field(b"blk.1.ffn_gate_exps.weight"))[0]
    struct.pack_into("<Q", data, offset_field(b"blk.1.ffn_up_exps.weight"), gate)
    bad = tmp_path / "o.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"o.gguf: corrupt tensor table: tensor 'blk.1.ffn_(up|gate)_exps.weight' "
                                             r"overlaps"):
        hybridmoe.load(bad)
