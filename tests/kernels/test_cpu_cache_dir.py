"""Compiled kernels are cached under a directory named by their sources, so code compiled from older sources (a
kernel's cached code includes what it calls from other files, which numba does not check) never runs after an
upgrade."""
import importlib.util
import shutil
from pathlib import Path

import numba

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
