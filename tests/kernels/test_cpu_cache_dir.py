"""Compiled kernels are cached under a directory named by their sources, so code compiled from older sources (a
kernel's cached code includes what it calls from other files, which numba does not check) never runs after an
upgrade."""
import importlib.util
import shutil
import sys
from pathlib import Path

import numba
import pytest

import hybridmoe.kernels.cpu as kernels


def load_copy(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, folder / "target.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cache_directory_changes_with_any_kernel_source(tmp_path, monkeypatch):
    assert numba.config.CACHE_DIR and Path(numba.config.CACHE_DIR).is_dir()  # the package set it at import
    folder = tmp_path / "kernels"
    folder.mkdir()
    shutil.copy(Path(kernels.__file__).parent / "target.py", folder)
    (folder / "int8.py").write_text("def quantize(): return 1\n")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))  # as NUMBA_CACHE_DIR would set it
    before = load_copy(folder, "target_copy_a").use_source_keyed_cache()
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    again = load_copy(folder, "target_copy_b").use_source_keyed_cache()
    (folder / "int8.py").write_text("def quantize(): return 2\n")  # another file than the caller's changed
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    after = load_copy(folder, "target_copy_c").use_source_keyed_cache()
    assert before == again != after
    assert Path(before).parent == Path(after).parent == tmp_path / "cache"
    assert numba.config.CACHE_DIR == after


def test_a_fresh_cache_is_told_before_loading(tmp_path, monkeypatch, capsys):
    """An empty cache means minutes of compiling on the first generation: the command line says so on a terminal
    once the model has loaded (not before a load that fails); a cache with kernels in it says nothing."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    shutil.copy(Path(kernels.__file__).parent / "target.py", folder)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    fresh = load_copy(folder, "target_copy_d")
    path = Path(fresh.use_source_keyed_cache())
    assert fresh.FRESH and str(path) in fresh.first_run_note()
    (path / "kernel.nbi").write_bytes(b"")  # what numba leaves there once a kernel compiled
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    warm = load_copy(folder, "target_copy_e")
    warm.use_source_keyed_cache()
    assert not warm.FRESH and warm.first_run_note() is None

    from hybridmoe import cli
    from hybridmoe.kernels.cpu import target
    monkeypatch.setattr(target, "FRESH", True)
    monkeypatch.setattr("hybridmoe.load", lambda *a, **k: "engine")
    args = cli.build_parser().parse_args(["generate", "demo", "-p", "hi"])
    assert cli.load_from_args(args) == "engine"
    assert capsys.readouterr().err == ""  # stderr read by a program: only what it asked for
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.load_from_args(args) == "engine"
    assert "note: first run of this version's CPU kernels" in capsys.readouterr().err

    def fails(*a, **k):
        raise cli.HybridMoEError("no such model")
    monkeypatch.setattr("hybridmoe.load", fails)
    with pytest.raises(cli.HybridMoEError):
        cli.load_from_args(args)
    assert capsys.readouterr().err == ""
