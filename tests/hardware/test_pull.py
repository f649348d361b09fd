"""`hybridmoe pull`: file selection, sizes and the disk check, all on fake listings (no network)."""
import pytest

from hybridmoe import pull as PL
from hybridmoe.cli import main
from hybridmoe.errors import HybridMoEError

G = 1 << 30
R1_GGUF = [PL.RemoteFile(p, s) for p, s in [
    (".gitattributes", 2000), ("README.md", 30000), ("params", 100),
    *[(f"DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-0000{i}-of-00009.gguf", 45 * G) for i in range(1, 10)],
    *[(f"DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-0000{i}-of-00003.gguf", 44 * G) for i in range(1, 4)],
    *[(f"DeepSeek-R1-UD-Q2_K_XL/DeepSeek-R1-UD-Q2_K_XL-0000{i}-of-00005.gguf", 45 * G) for i in range(1, 6)],
    ("DeepSeek-R1-Q8_0/DeepSeek-R1.Q8_0-00001-of-00015.gguf", 45 * G),
    ("BF16/DeepSeek-R1-BF16-00001-of-00030.gguf", 45 * G),
]]
QWEN_GGUF = [PL.RemoteFile(p, s) for p, s in [
    ("Qwen3-30B-A3B-Q4_K_M.gguf", 18 * G), ("Qwen3-30B-A3B-Q8_0.gguf", 32 * G),
    ("Qwen3-30B-A3B-UD-Q4_K_XL.gguf", 17 * G), ("qwen3-30b-a3b-iq2_xxs.gguf", 8 * G),
    ("mmproj-Qwen3-F16.gguf", G), ("README.md", 100),
]]
HF = [PL.RemoteFile(p, s) for p, s in [
    ("config.json", 1000), ("generation_config.json", 100), ("model-00001-of-00002.safetensors", 5 * G),
    ("model-00002-of-00002.safetensors", 4 * G), ("model.safetensors.index.json", 50000),
    ("tokenizer.json", 7_000_000), ("tokenizer_config.json", 5000), ("modeling_deepseek.py", 70000),
    ("original/consolidated.00.pth", 9 * G), ("figures/benchmark.png", 200000), ("README.md", 100),
]]


@pytest.mark.parametrize("path, quant", [
    ("DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf", "Q4_K_M"),
    ("DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf", "UD-IQ1_S"),
    ("Qwen3-30B-A3B-Q4_K_M.gguf", "Q4_K_M"),
    ("qwen3-30b-a3b-iq2_xxs.gguf", "IQ2_XXS"),
    ("Mixtral-8x7B-v0.1.Q5_K_M.gguf", "Q5_K_M"),
    ("BF16/DeepSeek-R1-BF16-00001-of-00030.gguf", "BF16"),
    ("Q4_K_M/model-00001-of-00002.gguf", "Q4_K_M"),
    ("model.gguf", None),
])
def test_quant_label_from_file_or_folder_name(path, quant):
    assert PL.quant_of(path) == quant


def test_one_quants_shards_are_selected_in_order():
    sel = PL.select("unsloth/DeepSeek-R1-GGUF", R1_GGUF, "q4_k_m")
    assert sel.kind == "gguf" and sel.quant == "Q4_K_M" and len(sel.files) == 9
    assert [f.path.split("-")[-3] for f in sel.files] == [f"0000{i}" for i in range(1, 10)]
    assert sel.total == 9 * 45 * G
    assert len(PL.select("unsloth/DeepSeek-R1-GGUF", R1_GGUF, "UD-IQ1_S").files) == 3
    assert PL.select("unsloth/DeepSeek-R1-GGUF", R1_GGUF, "Q2_K_XL").quant == "UD-Q2_K_XL"  # unique near match
    qwen = PL.select("unsloth/Qwen3-30B-A3B-GGUF", QWEN_GGUF, "Q4_K_M")
    assert [f.path for f in qwen.files] == ["Qwen3-30B-A3B-Q4_K_M.gguf"]
    assert "mmproj" not in " ".join(PL.available_quants(QWEN_GGUF))


def test_missing_quant_lists_what_exists():
    with pytest.raises(HybridMoEError) as e:
        PL.select("unsloth/DeepSeek-R1-GGUF", R1_GGUF, "Q3_K_S")
    msg = str(e.value)
    assert "Q3_K_S" in msg and "Q4_K_M" in msg and "UD-IQ1_S" in msg and "BF16" in msg and "\n" not in msg
    with pytest.raises(HybridMoEError, match="--quant: .*Q4_K_M"):
        PL.select("unsloth/DeepSeek-R1-GGUF", R1_GGUF, None)
    with pytest.raises(HybridMoEError, match="no GGUF files"):
        PL.select("deepseek-ai/DeepSeek-R1", HF, "Q4_K_M")


def test_safetensors_repo_takes_weights_json_and_tokenizer_only():
    sel = PL.select("deepseek-ai/DeepSeek-R1", HF, None)
    assert sel.kind == "safetensors"
    assert sorted(f.path for f in sel.files) == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json"]
    with pytest.raises(HybridMoEError, match="no .safetensors"):
        PL.select("x/y", [PL.RemoteFile("README.md", 1)], None)


def test_disk_check_counts_only_what_is_missing(tmp_path):
    sel = PL.select("unsloth/Qwen3-30B-A3B-GGUF", [PL.RemoteFile("a-Q4_K_M-00001-of-00002.gguf", 3000),
                                                   PL.RemoteFile("a-Q4_K_M-00002-of-00002.gguf", 2000)], "Q4_K_M")
    assert PL.check_space(sel, tmp_path, free_bytes=10_000) == 5000
    (tmp_path / "a-Q4_K_M-00001-of-00002.gguf").write_bytes(b"x" * 3000)  # complete: resumed past
    (tmp_path / "a-Q4_K_M-00002-of-00002.gguf").write_bytes(b"x" * 10)  # partial: fetched again
    assert PL.check_space(sel, tmp_path, free_bytes=2100) == 2000
    with pytest.raises(HybridMoEError, match=r"needs .* GiB more but the disk has .* GiB free"):
        PL.check_space(sel, tmp_path, free_bytes=1000)
    assert PL.check_space(sel, tmp_path / "not" / "yet") == 5000  # free space of the nearest existing folder


def test_dry_run_lists_files_and_sizes_without_network(tmp_path):
    lines = []
    target = PL.pull("unsloth/DeepSeek-R1-GGUF", "Q4_K_M", tmp_path, dry_run=True, out=lines.append,
                     lister=lambda repo, rev: R1_GGUF, free_bytes=1 << 40)
    assert lines[0].startswith("unsloth/DeepSeek-R1-GGUF: 9 file(s), 405.00 GiB (Q4_K_M)")
    assert sum("45.00 GiB" in line for line in lines) == 9 and lines[-1].startswith("dry run")
    assert target == tmp_path / "DeepSeek-R1-GGUF-Q4_K_M" / R1_GGUF[3].path
    with pytest.raises(HybridMoEError, match="405.0 GiB more"):
        PL.pull("unsloth/DeepSeek-R1-GGUF", "Q4_K_M", tmp_path, dry_run=True, out=lines.append,
                lister=lambda repo, rev: R1_GGUF, free_bytes=100 * G)
    with pytest.raises(HybridMoEError, match="owner/name"):
        PL.pull("DeepSeek-R1", lister=lambda repo, rev: R1_GGUF)


def test_cli_pull_offline_and_quant_errors_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["pull", "unsloth/DeepSeek-R1-GGUF", "--quant", "Q4_K_M", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "offline" in err and "\n" not in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    small = [PL.RemoteFile(f.path, 1000) for f in QWEN_GGUF]  # fits on any disk
    monkeypatch.setattr(PL, "list_files", lambda repo, rev=None: small)
    assert main(["pull", "unsloth/Qwen3-30B-A3B-GGUF", "--quant", "Q2_K", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "Q4_K_M" in err and "\n" not in err
    assert main(["pull", "unsloth/Qwen3-30B-A3B-GGUF", "--quant", "Q8_0", "--dir", str(tmp_path), "--dry-run"]) == 0
    assert "Qwen3-30B-A3B-Q8_0.gguf" in capsys.readouterr().out


def test_hub_errors_become_one_line():
    class RepositoryNotFoundError(Exception):
        pass

    class ConnectError(Exception):
        pass
    assert "no such repository" in str(PL._hub_error("a/b", RepositoryNotFoundError("404")))
    assert "cannot reach" in str(PL._hub_error("a/b", ConnectError("dns")))
    assert "disk filled" in str(PL._hub_error("a/b", OSError(28, "No space left on device")))


@pytest.mark.parametrize("bad", ["../../../home/user/.bashrc-Q4_K_M.gguf", "/etc/cron.d/x-Q4_K_M.gguf",
                                 "a/../../x-Q4_K_M.gguf", "x\x1b[2J-Q4_K_M.gguf", "x\r-Q4_K_M.gguf",
                                 "C:/Windows/x-Q4_K_M.gguf", "a\\..\\..\\x-Q4_K_M.gguf"])
def test_listing_names_outside_the_folder_or_with_control_characters_are_refused(bad, tmp_path):
    """The listing comes from the network: a name must stay inside the download folder and print as it is."""
    listing = [PL.RemoteFile("x-Q8_0.gguf", 10), PL.RemoteFile(bad, 10)]
    lines = []
    with pytest.raises(HybridMoEError, match="not a plain path inside the repository") as e:
        PL.pull("evil/repo", "Q4_K_M", tmp_path, dry_run=True, out=lines.append, lister=lambda repo, rev: listing,
                free_bytes=1 << 40)
    assert repr(bad) in str(e.value) and "\n" not in str(e.value) and not lines
    assert PL.select("evil/repo", listing, "Q8_0").files == [listing[0]]  # a bad name not picked does no harm


def test_minimum_hub_version_checks_names_on_write():
    """setup.cfg asks for a huggingface_hub that also refuses such names itself when it writes a file."""
    import configparser
    from pathlib import Path
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    req = next(r for r in cfg["options"]["install_requires"].split("\n") if r.startswith("huggingface_hub"))
    assert tuple(int(x) for x in req.split(">=")[1].split(".")) >= (1, 26)
    from huggingface_hub._local_folder import _validate_relative_filename
    for bad in ("../x.gguf", "/etc/x.gguf"):
        with pytest.raises(ValueError):
            _validate_relative_filename(bad)
