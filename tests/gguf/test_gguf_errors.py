"""Bad GGUF input gives one of our errors, naming the key or tensor and the file; never a traceback or a hang."""
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
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
    from hybridmoe.formats.convert import convert
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
